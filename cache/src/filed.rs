//! List answers copied once into a sealed memory file, sent with `sendfile`.
//!
//! Sending a list from memory costs the kernel a copy of every byte into
//! the socket: `perf` of kache serving 10,000 pods over plain HTTP puts
//! 40 % of its CPU there, and it is the whole difference with nginx, whose
//! `sendfile` hands the socket page-cache pages by reference. Heap pages
//! cannot be handed over that way: the receiver's queue (on loopback, the
//! peer's receive queue) keeps referencing them after kache frees or
//! reuses the memory. Pages of a file can, because the kernel counts their
//! references itself.
//!
//! So an unfiltered list sent again at the same version (once its store
//! has stood still for a second: [`crate::list::Items::filed`]) is copied
//! once into a memory file ([`file`]): `memfd_create`, the bytes written, then sealed
//! against writing, growing and shrinking, and mapped read-only. Its bytes
//! are a [`Bytes`] like any other (TLS, HTTP/2 and tests read them through
//! the mapping), and the file is registered by the address range of its
//! mapping. The listener's socket writer ([`FiledSlice`]) recognizes a slice in a
//! registered range and sends it with `sendfile` from the file at the
//! matching offset: the kernel takes page references, copies nothing, and
//! the pages live as long as a socket buffer holds them, whatever kache
//! does with the file after.
//!
//! What it costs: one copy of the list per version into the file, on a
//! blocking thread (answers meanwhile are sent from the store's bytes), and
//! the file's pages while it is held (counted in the memory budget with the
//! store's items, released once no list has used them for a while: see
//! [`crate::store::Store::release_idle_lists`]). The pages are shared
//! memory: a container's memory limit counts them, and kache's RSS does
//! only for pages it read through the mapping.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};

use bytes::Bytes;
use memmap2::Mmap;
use rustix::fs::{MemfdFlags, SealFlags};

/// Lists smaller than this are not filed: copying them into the socket
/// costs less than a file's page rounding and bookkeeping.
pub const MIN_LEN: usize = 256 * 1024;

/// At most this much is sent per `sendfile` call (nginx's
/// `sendfile_max_chunk`, 2 MB by default).
///
/// One call for a whole 30 MB list holds the socket for all of it: the
/// client's acknowledgements wait in the socket's backlog until the call
/// returns, and the data reaches the client in bursts. Measured on loopback
/// at 10,000 pods, kache against itself in turns: 2 MB calls answered
/// 10–25 % more lists a second than one call per list, in JSON and protobuf,
/// with 1 and 8 clients, and the client spent a fifth less CPU per list.
/// 512 KB calls were slower again; 8 MB ones no better than 2 MB.
pub const MAX_SEND: usize = 2 * 1024 * 1024;

/// Registered files by their mapping's start address.
static FILES: RwLock<BTreeMap<usize, Weak<Region>>> = RwLock::new(BTreeMap::new());
/// How many are registered: a socket writer looks up nothing while none is.
static REGISTERED: AtomicUsize = AtomicUsize::new(0);

/// A sealed memory file and its read-only mapping.
#[derive(Debug)]
struct Region {
    file: File,
    map: Mmap,
}

impl Region {
    fn start(&self) -> usize {
        self.map.as_ptr() as usize
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // Unregistered before the mapping goes: a slice being looked up is
        // held by its writer, so its region is not the one dropping.
        let mut files = FILES.write().unwrap_or_else(PoisonError::into_inner);
        files.remove(&self.start());
        REGISTERED.store(files.len(), Ordering::Release);
    }
}

/// The owner of a filed [`Bytes`].
struct Owner(Arc<Region>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

/// `parts`, in order, copied into a new sealed memory file: one [`Bytes`]
/// of `len` bytes, which a [`FiledSlice`] sends without copying.
///
/// # Errors
/// The file could not be made (no `memfd_create` under a seccomp profile,
/// or the shared memory limit reached); the caller sends `parts` instead.
pub fn file(parts: &[Bytes], len: usize) -> io::Result<Bytes> {
    let fd = rustix::fs::memfd_create("kache-list", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    let mut file = File::from(fd);
    file.set_len(u64::try_from(len).map_err(io::Error::other)?)?;
    for batch in parts.chunks(1024) {
        let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|part| IoSlice::new(part)).collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            let written = file.write_vectored(slices)?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, written);
        }
    }
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    let map = map(&file)?;
    if map.len() != len {
        return Err(io::Error::other("filed list: mapped length differs"));
    }
    let region = Arc::new(Region { file, map });
    {
        let mut files = FILES.write().unwrap_or_else(PoisonError::into_inner);
        files.insert(region.start(), Arc::downgrade(&region));
        REGISTERED.store(files.len(), Ordering::Release);
    }
    Ok(Bytes::from_owner(Owner(region)))
}

/// The file mapped read-only.
///
/// The one `unsafe` in kache: a mapping is only sound to read as `&[u8]`
/// while nothing changes or truncates the file. This file is sealed
/// against writing, growing and shrinking (and against unsealing) before
/// it is mapped, so the kernel refuses any change, from this process or
/// another holding the descriptor.
#[allow(unsafe_code)]
fn map(file: &File) -> io::Result<Mmap> {
    // SAFETY: `file` is a memfd sealed with F_SEAL_WRITE | F_SEAL_GROW |
    // F_SEAL_SHRINK | F_SEAL_SEAL (see `file`): its bytes and length can no
    // longer change while the mapping exists.
    unsafe { Mmap::map(file) }
}

/// A slice lying in a filed list: where in which file.
#[derive(Debug)]
pub struct FiledSlice {
    region: Arc<Region>,
    offset: usize,
    len: usize,
}

impl FiledSlice {
    /// The file `slice` lies in, if it lies in a filed list.
    pub fn find(slice: &[u8]) -> Option<FiledSlice> {
        let (region, offset) = lookup(slice)?;
        Some(FiledSlice {
            region,
            offset,
            len: slice.len(),
        })
    }

    /// Writes the slice to `socket` with `sendfile`, at most [`MAX_SEND`]
    /// of it: how much it took.
    ///
    /// # Errors
    /// As `sendfile(2)`, `WouldBlock` included: the caller waits for the
    /// socket and asks again.
    pub fn send(&self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        let mut offset = self.offset as u64;
        let len = self.len.min(MAX_SEND);
        rustix::fs::sendfile(socket, self.region.file.as_fd(), Some(&mut offset), len)
            .map_err(io::Error::from)
    }
}

/// Whether `slice` lies in a filed list.
pub fn is_filed(slice: &[u8]) -> bool {
    lookup(slice).is_some()
}

/// The region `slice` lies in, and where in it.
fn lookup(slice: &[u8]) -> Option<(Arc<Region>, usize)> {
    if slice.is_empty() || REGISTERED.load(Ordering::Acquire) == 0 {
        return None;
    }
    let address = slice.as_ptr() as usize;
    let files = FILES.read().unwrap_or_else(PoisonError::into_inner);
    let (&start, region) = files.range(..=address).next_back()?;
    let region = region.upgrade()?;
    let offset = address - start;
    (offset + slice.len() <= region.map.len()).then_some((region, offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> Vec<Bytes> {
        (0..5000)
            .map(|i| Bytes::from(format!("{{\"item\":{i},\"pad\":\"{}\"}},", "x".repeat(i % 97))))
            .collect()
    }

    #[test]
    fn a_filed_list_holds_its_parts_in_order() {
        let parts = parts();
        let len = parts.iter().map(Bytes::len).sum();
        let filed = file(&parts, len).expect("memfd");
        assert_eq!(filed.len(), len);
        assert_eq!(filed, parts.concat());
        assert!(is_filed(&filed[10..20]));
        assert!(!is_filed(&parts[0]), "heap bytes are not filed");
        drop(filed);
    }

    #[test]
    fn a_dropped_file_is_no_longer_recognized() {
        let parts = parts();
        let len = parts.iter().map(Bytes::len).sum();
        let filed = file(&parts, len).expect("memfd");
        let copy = filed.to_vec();
        let address = filed.as_ptr() as usize;
        drop(filed);
        let files = FILES.read().unwrap_or_else(PoisonError::into_inner);
        assert!(!files.contains_key(&address));
        drop(files);
        assert!(!is_filed(&copy));
    }

    #[test]
    fn the_file_is_sealed() {
        let parts = parts();
        let len = parts.iter().map(Bytes::len).sum();
        let filed = file(&parts, len).expect("memfd");
        let (region, _) = lookup(&filed).expect("registered");
        let mut file = &region.file;
        assert!(file.write_all(b"changed").is_err(), "sealed against writing");
        assert!(region.file.set_len(1).is_err(), "sealed against shrinking");
        assert_eq!(filed, parts.concat());
    }

    #[test]
    fn send_writes_the_slice_through_a_socket() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let parts = parts();
        let len = parts.iter().map(Bytes::len).sum();
        let filed = file(&parts, len).expect("memfd");
        let (a, mut b) = UnixStream::pair().expect("pair");
        let slice = filed.slice(100..1100);
        let reader = std::thread::spawn(move || {
            let mut out = vec![0; 1000];
            b.read_exact(&mut out).expect("read");
            out
        });
        let mut sent = 0;
        while sent < slice.len() {
            sent += FiledSlice::find(&slice[sent..])
                .expect("a filed slice")
                .send(a.as_fd())
                .expect("sendfile");
        }
        assert_eq!(reader.join().expect("reader"), slice);
        assert!(
            FiledSlice::find(b"heap").is_none(),
            "heap bytes are sent as usual"
        );
    }

    #[test]
    fn a_large_slice_goes_out_in_calls_of_at_most_max_send() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let parts: Vec<Bytes> = (0..5u8).map(|i| Bytes::from(vec![b'a' + i; MAX_SEND])).collect();
        let filed = file(&parts, 5 * MAX_SEND).expect("memfd");
        let (a, mut b) = UnixStream::pair().expect("pair");
        let slice = filed.slice(7..filed.len() - 7);
        let expected = slice.len();
        let reader = std::thread::spawn(move || {
            let mut out = vec![0; expected];
            b.read_exact(&mut out).expect("read");
            out
        });
        let (mut sent, mut calls) = (0, 0);
        while sent < slice.len() {
            let took = FiledSlice::find(&slice[sent..])
                .expect("a filed slice")
                .send(a.as_fd())
                .expect("sendfile");
            assert!(took <= MAX_SEND, "{took} bytes in one call");
            sent += took;
            calls += 1;
        }
        assert!(calls >= 5, "{calls} calls for {} bytes", slice.len());
        assert_eq!(reader.join().expect("reader"), slice);
    }
}
