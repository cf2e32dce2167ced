//! On-disk snapshots of one cached store (one resource in one encoding), so
//! a restarted kache can resume with a WATCH from the snapshot's
//! resourceVersion instead of a LIST. Format and file I/O only: when to save
//! and how to load into a store is the caller's business.
//!
//! ```text
//!   offset 0   ┌──────────────────────────────┐
//!              │ magic  b"KACHESNP"   8 bytes │
//!          8   │ format version  u32 LE       │  FORMAT_VERSION; anything else → Format
//!         12   ├──────────────────────────────┤
//!              │ payload (postcard):          │
//!              │   SnapshotHeader             │  identity, resourceVersion, object count
//!              │   varint n                   │  = header.object_count
//!              │   n × (varint len, bytes)    │  each object's stored bytes (JSON or
//!              │                              │  protobuf message), as postcard byte strings
//!   len - 4    ├──────────────────────────────┤
//!              │ CRC-32 (IEEE) u32 LE         │  over every byte before it
//!              └──────────────────────────────┘
//! ```
//!
//! The payload is exactly postcard's encoding of `(SnapshotHeader, Vec<Vec<u8>>)`,
//! written and read one object at a time so a big store is never held twice.
//!
//! A file is written to a temporary name in the same directory, fsynced,
//! renamed over its final name and the directory fsynced, so a crash leaves
//! either the old snapshot or the new one, plus at worst a temporary file that
//! [`list`] and [`read`] never look at ([`remove_temporaries`] clears them).
//!
//! A snapshot is only as good as its resourceVersion and its cluster: [`read`]
//! refuses one written for another cluster, upstream, resource or encoding.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// The first bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"KACHESNP";

/// The layout this build writes and reads. Bump it on any change to the
/// header or the payload; a snapshot of another version is discarded (a
/// LIST is cheaper than a migration).
pub const FORMAT_VERSION: u32 = 1;

/// Snapshot files end with this; temporary files never do.
const SUFFIX: &str = ".ksnap";
/// Temporary files (`.<final name>.<pid>.<n>.tmp`) end with this.
const TEMP_SUFFIX: &str = ".tmp";
const PREFIX_LEN: u64 = 12;
const CHECKSUM_LEN: u64 = 4;
/// Longest readable part of a file name: file systems allow 255 bytes, and
/// the temporary name adds a dot, a pid and a counter.
const MAX_STEM: usize = 200;
/// Room for the header's strings while decoding it (postcard's reader copies
/// each string through it). Far beyond any URL, UID or resource name.
const HEADER_SCRATCH: u64 = 1 << 20;
const IO_BUFFER: usize = 1 << 16;

/// What a snapshot says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// [`FORMAT_VERSION`] when written by this build ([`write`] stamps it).
    pub format_version: u32,
    pub upstream_url: String,
    /// The UID of the cluster's `kube-system` namespace.
    pub cluster_uid: String,
    pub group: String,
    pub version: String,
    pub resource: String,
    /// `"json"` or `"protobuf"` (`store::Encoding::as_str`).
    pub encoding: String,
    /// The store's resourceVersion: resume the watch from here.
    pub resource_version: u64,
    /// How many objects follow ([`write`] stamps it).
    pub object_count: u64,
    pub written_at_unix_ms: u64,
}

impl SnapshotHeader {
    /// A header for the store `identity` at `resource_version`, stamped now.
    pub fn new(identity: &Expectation, resource_version: u64) -> SnapshotHeader {
        let written_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        SnapshotHeader {
            format_version: FORMAT_VERSION,
            upstream_url: identity.upstream_url.clone(),
            cluster_uid: identity.cluster_uid.clone(),
            group: identity.group.clone(),
            version: identity.version.clone(),
            resource: identity.resource.clone(),
            encoding: identity.encoding.clone(),
            resource_version,
            object_count: 0,
            written_at_unix_ms,
        }
    }
}

/// The store a snapshot must belong to for [`read`] to accept it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    pub upstream_url: String,
    /// The UID of the cluster's `kube-system` namespace.
    pub cluster_uid: String,
    pub group: String,
    pub version: String,
    pub resource: String,
    /// `"json"` or `"protobuf"`.
    pub encoding: String,
}

/// A snapshot as read: its header and each object's bytes, in the order
/// written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub header: SnapshotHeader,
    pub objects: Vec<Bytes>,
}

/// Why a snapshot could not be written or used. Every one means "start cold
/// with a LIST"; none affects serving.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file system refused (missing or read-only directory, disk full…).
    #[error("snapshot I/O on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Written by a kache with another snapshot layout.
    #[error("snapshot format version {found}, this kache reads version {expected}")]
    Format { found: u32, expected: u32 },
    /// Not a snapshot, or damaged (checksum mismatch, undecodable payload).
    #[error("corrupt snapshot: {0}")]
    Corrupt(String),
    /// The file ends early.
    #[error("truncated snapshot")]
    Truncated,
    /// A sound snapshot of another cluster, upstream, resource or encoding.
    #[error("snapshot of another {what}: found {found:?}, expected {expected:?}")]
    Foreign {
        what: &'static str,
        found: String,
        expected: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The file in `dir` that holds the snapshot of `identity`'s store (derived
/// from group, version, resource and encoding only).
pub fn path(dir: &Path, identity: &Expectation) -> PathBuf {
    dir.join(file_name(
        &identity.group,
        &identity.version,
        &identity.resource,
        &identity.encoding,
    ))
}

/// Writes a snapshot of `objects` (each object's stored bytes) atomically to
/// its file in `dir`, creating `dir` (mode 0700) if needed, and returns the
/// file's path. The header's `format_version` and `object_count` are stamped
/// from what is written. The file is mode 0600: a store may hold Secrets.
///
/// Streams: memory use is a buffer, not a second copy of the store.
///
/// # Errors
/// [`SnapshotError::Io`] when the directory or file cannot be created,
/// written, synced or renamed (read-only, disk full…); the temporary file is
/// removed and any previous snapshot is left as it was.
pub fn write(
    dir: &Path,
    header: &SnapshotHeader,
    objects: &[impl AsRef<[u8]>],
) -> Result<PathBuf, SnapshotError> {
    create_dir(dir).map_err(io_error(dir))?;
    let name = file_name(&header.group, &header.version, &header.resource, &header.encoding);
    let path = dir.join(&name);
    let temp = dir.join(temp_name(&name));
    let result = write_file(&temp, header, objects)
        .and_then(|()| fs::rename(&temp, &path).map_err(io_error(&path)))
        .and_then(|()| sync_dir(dir).map_err(io_error(dir)));
    if result.is_err() {
        // Best effort: after a failed rename the temporary file is still
        // there; after a successful one this finds nothing.
        let _ = fs::remove_file(&temp);
    }
    result.map(|()| path)
}

fn write_file(
    temp: &Path,
    header: &SnapshotHeader,
    objects: &[impl AsRef<[u8]>],
) -> Result<(), SnapshotError> {
    let header = SnapshotHeader {
        format_version: FORMAT_VERSION,
        object_count: objects.len() as u64,
        ..header.clone()
    };
    let header =
        postcard::to_stdvec(&header).expect("invariant: a struct of strings and integers always encodes");
    create_private(temp)
        .and_then(|file| write_contents(file, &header, objects))
        .map_err(io_error(temp))
}

/// Streams the prefix, the payload and the checksum into `file`, then syncs
/// it.
fn write_contents(file: File, header: &[u8], objects: &[impl AsRef<[u8]>]) -> io::Result<()> {
    let mut out = Summing {
        inner: BufWriter::with_capacity(IO_BUFFER, file),
        hasher: crc32fast::Hasher::new(),
    };
    let mut varint = [0u8; 10];
    out.write_all(MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes())?;
    out.write_all(header)?;
    out.write_all(encode_varint(objects.len() as u64, &mut varint))?;
    for object in objects {
        let object = object.as_ref();
        out.write_all(encode_varint(object.len() as u64, &mut varint))?;
        out.write_all(object)?;
    }
    let Summing { mut inner, hasher } = out;
    inner.write_all(&hasher.finalize().to_le_bytes())?;
    let file = inner.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_all()
}

/// postcard's varint (LEB128) for a u64, which is also how it prefixes a
/// sequence or a byte string with its length.
fn encode_varint(n: u64, buf: &mut [u8; 10]) -> &[u8] {
    postcard::to_slice(&n, buf).expect("invariant: a u64 varint fits in 10 bytes")
}

/// Reads the snapshot at `path` and checks that it is whole and belongs to
/// the store `expect` describes. Never panics, whatever the file holds; its
/// size bounds every allocation.
///
/// # Errors
/// [`SnapshotError::Io`] when the file cannot be read (`NotFound` if there is
/// none); [`SnapshotError::Format`] for another format version;
/// [`SnapshotError::Truncated`] or [`SnapshotError::Corrupt`] for a damaged
/// file; [`SnapshotError::Foreign`] for a sound snapshot of another store,
/// checked only once the checksum holds, so damage is never reported as
/// foreign.
pub fn read(path: &Path, expect: &Expectation) -> Result<Snapshot, SnapshotError> {
    let file = File::open(path).map_err(io_error(path))?;
    let len = file.metadata().map_err(io_error(path))?.len();
    let mut file = BufReader::with_capacity(IO_BUFFER, file);

    let mut prefix = [0u8; PREFIX_LEN as usize];
    let got = read_up_to(&mut file, &mut prefix).map_err(io_error(path))?;
    let magic_len = got.min(MAGIC.len());
    if prefix[..magic_len] != MAGIC[..magic_len] {
        return Err(SnapshotError::Corrupt("not a kache snapshot (bad magic)".into()));
    }
    if got < prefix.len() {
        return Err(SnapshotError::Truncated);
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&prefix[MAGIC.len()..]);
    let found = u32::from_le_bytes(version);
    if found != FORMAT_VERSION {
        return Err(SnapshotError::Format {
            found,
            expected: FORMAT_VERSION,
        });
    }
    let Some(payload_len) = len.checked_sub(PREFIX_LEN + CHECKSUM_LEN) else {
        return Err(SnapshotError::Truncated);
    };

    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&prefix);
    let mut payload = Payload {
        path,
        source: Checked {
            inner: &mut file,
            hasher,
            remaining: payload_len,
            eof: false,
            error: None,
        },
    };
    let header: SnapshotHeader = payload.decode(HEADER_SCRATCH.min(payload_len), "header")?;
    if header.format_version != FORMAT_VERSION {
        return Err(SnapshotError::Corrupt(format!(
            "header says format version {}, prefix says {FORMAT_VERSION}",
            header.format_version
        )));
    }
    let foreign = mismatch(&header, expect);
    let objects = if foreign.is_some() {
        // Only to verify the checksum: a foreign header could be damage.
        payload.skip_rest()?;
        Vec::new()
    } else {
        payload.objects(header.object_count)?
    };
    if payload.source.remaining != 0 {
        return Err(SnapshotError::Corrupt("bytes after the last object".into()));
    }
    let computed = payload.source.hasher.clone().finalize();
    let mut stored = [0u8; CHECKSUM_LEN as usize];
    match file.read_exact(&mut stored) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(SnapshotError::Truncated),
        Err(e) => return Err(io_error(path)(e)),
    }
    if u32::from_le_bytes(stored) != computed {
        return Err(SnapshotError::Corrupt("checksum mismatch".into()));
    }
    if let Some(foreign) = foreign {
        return Err(foreign);
    }
    Ok(Snapshot { header, objects })
}

/// The first way `header` is not of the store `expect` describes.
fn mismatch(header: &SnapshotHeader, expect: &Expectation) -> Option<SnapshotError> {
    [
        ("cluster", &header.cluster_uid, &expect.cluster_uid),
        ("upstream", &header.upstream_url, &expect.upstream_url),
        ("group", &header.group, &expect.group),
        ("version", &header.version, &expect.version),
        ("resource", &header.resource, &expect.resource),
        ("encoding", &header.encoding, &expect.encoding),
    ]
    .into_iter()
    .find(|(_, found, expected)| found != expected)
    .map(|(what, found, expected)| SnapshotError::Foreign {
        what,
        found: found.clone(),
        expected: expected.clone(),
    })
}

/// The payload of a file being read: decodes from the checksummed, bounded
/// source and turns short reads and bad encodings into snapshot errors.
struct Payload<'a, R> {
    path: &'a Path,
    source: Checked<R>,
}

impl<R: Read> Payload<'_, R> {
    fn decode<T: serde::de::DeserializeOwned>(
        &mut self,
        scratch: u64,
        what: &str,
    ) -> Result<T, SnapshotError> {
        let mut scratch = vec![0u8; usize::try_from(scratch).unwrap_or(usize::MAX)];
        match postcard::from_io::<T, _>((&mut self.source, &mut scratch)) {
            Ok((value, _)) => Ok(value),
            Err(e) => Err(self.failure(format!("undecodable {what}: {e}"))),
        }
    }

    /// What a failed read means: an I/O error, the end of the payload, or
    /// (otherwise) damage described by `corrupt`.
    fn failure(&mut self, corrupt: String) -> SnapshotError {
        if let Some(source) = self.source.error.take() {
            io_error(self.path)(source)
        } else if self.source.eof {
            SnapshotError::Truncated
        } else {
            SnapshotError::Corrupt(corrupt)
        }
    }

    fn objects(&mut self, expected: u64) -> Result<Vec<Bytes>, SnapshotError> {
        let count: u64 = self.decode(0, "object count")?;
        if count != expected {
            return Err(SnapshotError::Corrupt(format!(
                "{count} objects, header says {expected}"
            )));
        }
        // Each object takes at least its one-byte length.
        if count > self.source.remaining {
            return Err(SnapshotError::Corrupt(format!(
                "{count} objects cannot fit the file"
            )));
        }
        // The count is not yet checksummed: don't trust it with a big allocation.
        let mut objects = Vec::with_capacity(usize::try_from(count.min(1 << 16)).unwrap_or(0));
        for _ in 0..count {
            let len: u64 = self.decode(0, "object length")?;
            if len > self.source.remaining {
                return Err(SnapshotError::Truncated);
            }
            let mut object = vec![0u8; usize::try_from(len).unwrap_or(0)];
            if self.source.read_exact(&mut object).is_err() {
                return Err(self.failure("short object".into()));
            }
            objects.push(Bytes::from(object));
        }
        Ok(objects)
    }

    fn skip_rest(&mut self) -> Result<(), SnapshotError> {
        match io::copy(&mut self.source, &mut io::sink()) {
            Ok(_) if self.source.remaining == 0 => Ok(()),
            Ok(_) => Err(SnapshotError::Truncated),
            Err(_) => Err(self.failure("unreadable payload".into())),
        }
    }
}

/// A reader limited to the payload that checksums what passes through and
/// remembers why it stopped (postcard's reader keeps neither).
struct Checked<R> {
    inner: R,
    hasher: crc32fast::Hasher,
    remaining: u64,
    eof: bool,
    error: Option<io::Error>,
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if max == 0 && !buf.is_empty() {
            self.eof = true;
            return Ok(0);
        }
        match self.inner.read(&mut buf[..max]) {
            Ok(n) => {
                if n == 0 && max > 0 {
                    self.eof = true;
                }
                self.hasher.update(&buf[..n]);
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let kind = e.kind();
                self.error = Some(e);
                Err(kind.into())
            }
        }
    }
}

/// A writer that checksums what passes through.
struct Summing<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Fills `buf` as far as the reader goes; returns how much it filled.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The snapshot files in `dir`, sorted; temporary files of unfinished writes
/// are left out. An unreadable or missing directory has none.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut paths = files_in(dir, |name| name.ends_with(SUFFIX));
    paths.sort();
    paths
}

/// Deletes the snapshot at `path`; one that is already gone is no error.
///
/// # Errors
/// [`SnapshotError::Io`] when the file exists but cannot be removed.
pub fn remove(path: &Path) -> Result<(), SnapshotError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Deletes the temporary files that crashed writes left in `dir` and returns
/// how many. Call it at startup, before this process writes: a temporary
/// file of a write in progress (of any process sharing the directory) would
/// go too.
///
/// # Errors
/// [`SnapshotError::Io`] when one cannot be removed.
pub fn remove_temporaries(dir: &Path) -> Result<usize, SnapshotError> {
    let temps = files_in(dir, |name| name.starts_with('.') && name.ends_with(TEMP_SUFFIX));
    for temp in &temps {
        remove(temp)?;
    }
    Ok(temps.len())
}

fn files_in(dir: &Path, wanted: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .filter(|entry| entry.file_name().to_str().is_some_and(&wanted))
        .map(|entry| entry.path())
        .collect()
}

/// `<group>_<version>_<resource>_<encoding>.ksnap`, each part escaped so that
/// only `[a-z0-9.-]` and `%XX` remain: no separators, no `_` inside a part,
/// no case-only differences; the core group is the empty first part. Names
/// too long for a file system keep a readable prefix and a CRC of the whole
/// (a collision would only make [`read`] report the other store as foreign).
fn file_name(group: &str, version: &str, resource: &str, encoding: &str) -> String {
    let stem = [group, version, resource, encoding].map(escape).join("_");
    if stem.len() <= MAX_STEM {
        return format!("{stem}{SUFFIX}");
    }
    let whole = crc32fast::hash([group, version, resource, encoding].join("\0").as_bytes());
    // The stem is ASCII, so any byte index is a char boundary.
    format!("{}~{whole:08x}{SUFFIX}", &stem[..MAX_STEM - 9])
}

fn escape(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for byte in part.bytes() {
        if byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'.' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `.<name>.<pid>.<n>.tmp`: unique within the directory, never a snapshot
/// name.
fn temp_name(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(".{name}.{}.{n}{TEMP_SUFFIX}", std::process::id())
}

fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn create_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
