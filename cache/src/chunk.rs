//! A body chunk made of several byte slices, written with one vectored write.
//!
//! An answer from memory is mostly bytes the stores already hold: a list is
//! its objects between small separators, a watch's replay is each object
//! between an event's head and tail. Copying those into one contiguous
//! buffer per frame costs a pass over every byte of every answer (a
//! 10,000-pod list is 42 MB); sending each slice as its own body frame costs
//! a trip through every body layer per slice. A [`Chunk`] is the middle
//! way: one frame holding several slices, which hyper hands to the socket
//! as one `writev` (its HTTP/1 write queue takes any [`bytes::Buf`] and asks
//! it for its slices, at most [`MAX_SLICES`] at a time).
//!
//! A chunk owns its slices ([`Chunk::push`]), or it is a range of a
//! [`Parts`] array shared by every answer that sends it ([`Chunk::shared`]):
//! a list assembled once and sent to many clients costs each of them one
//! reference count per chunk, not one per object.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;

use crate::upstream::FetchError;

/// A streamed answer from memory, chunk by chunk.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, FetchError>> + Send>>;

/// How many slices hyper writes at once (`MAX_WRITEV_BUFS`): the most a
/// chunk of shared parts is cut to hold.
pub const MAX_SLICES: usize = 64;

/// Slices shared by the chunks cut from them; none is empty.
pub type Parts = Arc<[Bytes]>;

/// Bytes in one or more slices, in order.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    repr: Repr,
    remaining: usize,
}

#[derive(Debug, Clone)]
enum Repr {
    /// `first` is the slice being written; it is empty only if the whole
    /// chunk is.
    Owned { first: Bytes, rest: VecDeque<Bytes> },
    /// `parts[at][offset..]`, then `parts[at + 1..end]`.
    Shared {
        parts: Parts,
        at: usize,
        end: usize,
        offset: usize,
    },
}

impl Default for Repr {
    fn default() -> Repr {
        Repr::Owned {
            first: Bytes::new(),
            rest: VecDeque::new(),
        }
    }
}

impl Chunk {
    /// `parts[range]`, sharing `parts`: nothing copied, one reference taken.
    pub fn shared(parts: &Parts, range: Range<usize>) -> Chunk {
        let slices = &parts[range.clone()];
        debug_assert!(slices.iter().all(|part| !part.is_empty()));
        Chunk {
            remaining: slices.iter().map(Bytes::len).sum(),
            repr: if range.is_empty() {
                Repr::default()
            } else {
                Repr::Shared {
                    parts: Arc::clone(parts),
                    at: range.start,
                    end: range.end,
                    offset: 0,
                }
            },
        }
    }

    /// How many bytes are left.
    pub fn len(&self) -> usize {
        self.remaining
    }

    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// How many slices are left.
    pub fn slice_count(&self) -> usize {
        match &self.repr {
            Repr::Owned { first, rest } => usize::from(!first.is_empty()) + rest.len(),
            Repr::Shared { at, end, .. } => end - at,
        }
    }

    /// The slices left, in order.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        let (owned, shared) = match &self.repr {
            Repr::Owned { first, rest } => (Some((first, rest)), None),
            Repr::Shared {
                parts,
                at,
                end,
                offset,
            } => (None, Some((&parts[*at..*end], *offset))),
        };
        let owned = owned.into_iter().flat_map(|(first, rest)| {
            std::iter::once(first)
                .filter(|first| !first.is_empty())
                .chain(rest)
                .map(|slice| &slice[..])
        });
        let shared = shared.into_iter().flat_map(|(parts, offset)| {
            parts
                .iter()
                .enumerate()
                .map(move |(i, part)| if i == 0 { &part[offset..] } else { &part[..] })
        });
        owned.chain(shared)
    }

    /// Appends `bytes` (nothing copied).
    pub fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.remaining += bytes.len();
        match &mut self.repr {
            Repr::Owned { first, rest } => {
                if first.is_empty() {
                    *first = bytes;
                } else {
                    rest.push_back(bytes);
                }
            }
            Repr::Shared { .. } => {
                let mut owned = Chunk::default();
                owned.append(std::mem::take(self));
                owned.push(bytes);
                *self = owned;
            }
        }
    }

    /// Appends `other`'s slices (nothing copied).
    pub fn append(&mut self, other: Chunk) {
        for slice in other.into_owned_slices() {
            self.push(slice);
        }
    }

    /// The bytes in one buffer: the slice itself if there is one, else a copy.
    pub fn into_bytes(mut self) -> Bytes {
        let len = self.remaining;
        self.copy_to_bytes(len)
    }

    /// The slices left, each owned (a reference taken on each).
    fn into_owned_slices(self) -> Vec<Bytes> {
        match self.repr {
            Repr::Owned { first, rest } => std::iter::once(first).chain(rest).collect(),
            Repr::Shared {
                parts,
                at,
                end,
                offset,
            } => (at..end)
                .map(|i| {
                    if i == at {
                        parts[i].slice(offset..)
                    } else {
                        parts[i].clone()
                    }
                })
                .collect(),
        }
    }
}

impl From<Bytes> for Chunk {
    fn from(bytes: Bytes) -> Chunk {
        let mut chunk = Chunk::default();
        chunk.push(bytes);
        chunk
    }
}

impl Buf for Chunk {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        match &self.repr {
            Repr::Owned { first, .. } => first,
            Repr::Shared {
                parts, at, offset, ..
            } => &parts[*at][*offset..],
        }
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of a chunk");
        self.remaining -= cnt;
        match &mut self.repr {
            Repr::Owned { first, rest } => {
                while cnt > 0 {
                    let step = cnt.min(first.len());
                    first.advance(step);
                    cnt -= step;
                    if first.is_empty() {
                        *first = rest.pop_front().unwrap_or_default();
                    }
                }
            }
            Repr::Shared {
                parts,
                at,
                end,
                offset,
            } => {
                while cnt > 0 {
                    let step = cnt.min(parts[*at].len() - *offset);
                    *offset += step;
                    cnt -= step;
                    if *offset == parts[*at].len() {
                        *at += 1;
                        *offset = 0;
                    }
                }
                if *at == *end {
                    self.repr = Repr::default();
                }
            }
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (slot, slice) in dst.iter_mut().zip(self.slices()) {
            *slot = IoSlice::new(slice);
            filled += 1;
        }
        filled
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.remaining, "copy_to_bytes past the end of a chunk");
        if let Repr::Owned { first, rest } = &mut self.repr {
            if len <= first.len() {
                // Within one slice: shared, not copied.
                self.remaining -= len;
                let bytes = first.split_to(len);
                if first.is_empty() {
                    *first = rest.pop_front().unwrap_or_default();
                }
                return bytes;
            }
        }
        let mut out = BytesMut::with_capacity(len);
        while out.len() < len {
            let step = (len - out.len()).min(self.chunk().len());
            out.extend_from_slice(&self.chunk()[..step]);
            self.advance(step);
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_of(parts: &[&'static str]) -> Chunk {
        let mut chunk = Chunk::default();
        for part in parts {
            chunk.push(Bytes::from_static(part.as_bytes()));
        }
        chunk
    }

    fn contents(chunk: &Chunk) -> Vec<u8> {
        chunk.slices().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn advancing_across_slices_keeps_the_rest_in_order() {
        let whole = b"abcdefghij";
        for at in 0..=whole.len() {
            let mut chunk = chunk_of(&["abc", "", "defg", "h", "ij"]);
            assert_eq!(chunk.slice_count(), 4);
            chunk.advance(at);
            assert_eq!(chunk.remaining(), whole.len() - at);
            assert_eq!(contents(&chunk), &whole[at..]);
            if at < whole.len() {
                assert_eq!(chunk.chunk().first(), Some(&whole[at]));
            } else {
                assert!(chunk.chunk().is_empty());
            }
        }
    }

    #[test]
    fn copy_to_bytes_shares_one_slice_and_copies_across_several() {
        let whole = b"abcdefghij";
        for at in 0..=whole.len() {
            for len in 0..=whole.len() - at {
                let mut chunk = chunk_of(&["abc", "defg", "h", "ij"]);
                chunk.advance(at);
                let first = chunk.chunk().as_ptr();
                let taken = chunk.copy_to_bytes(len);
                assert_eq!(&taken[..], &whole[at..at + len]);
                assert_eq!(contents(&chunk), &whole[at + len..]);
                assert_eq!(chunk.remaining(), whole.len() - at - len);
                if len > 0 && len <= 3 && at == 0 {
                    assert_eq!(taken.as_ptr(), first, "within the first slice: not copied");
                }
            }
        }
    }

    #[test]
    fn vectored_slices_are_the_chunk() {
        let chunk = chunk_of(&["abc", "defg", "h", "ij"]);
        let mut slots = [IoSlice::new(&[]); 3];
        assert_eq!(chunk.chunks_vectored(&mut slots), 3);
        let written: Vec<u8> = slots.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(written, b"abcdefgh");
        assert_eq!(chunk.clone().into_bytes(), Bytes::from_static(b"abcdefghij"));
        let mut all = [IoSlice::new(&[]); 8];
        assert_eq!(chunk.chunks_vectored(&mut all), 4);
    }

    fn parts_of(parts: &[&'static str]) -> Parts {
        parts.iter().map(|p| Bytes::from_static(p.as_bytes())).collect()
    }

    #[test]
    fn shared_chunks_are_their_range_of_the_parts() {
        let parts = parts_of(&["abc", "defg", "h", "ij", "klm"]);
        let whole = b"defghij";
        for at in 0..=whole.len() {
            let mut chunk = Chunk::shared(&parts, 1..4);
            assert_eq!((chunk.len(), chunk.slice_count()), (7, 3));
            chunk.advance(at);
            assert_eq!(chunk.remaining(), whole.len() - at);
            assert_eq!(contents(&chunk), &whole[at..]);
            assert_eq!(chunk.chunk().first(), whole.get(at));
            let mut slots = [IoSlice::new(&[]); 8];
            let n = chunk.chunks_vectored(&mut slots);
            let written: Vec<u8> = slots[..n].iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(written, &whole[at..]);
        }
        // The slices are the parts' own bytes.
        let chunk = Chunk::shared(&parts, 1..4);
        assert_eq!(chunk.slices().next().map(<[u8]>::as_ptr), Some(parts[1].as_ptr()));
        assert_eq!(Arc::strong_count(&parts), 2, "one reference for the whole chunk");
        // Copied out across parts, and appended to an owned chunk.
        let mut copied = Chunk::shared(&parts, 0..5);
        assert_eq!(copied.copy_to_bytes(5), Bytes::from_static(b"abcde"));
        assert_eq!(contents(&copied), b"fghijklm");
        let mut owned = Chunk::from(Bytes::from_static(b"<"));
        owned.append(copied);
        owned.push(Bytes::from_static(b">"));
        assert_eq!(owned.into_bytes(), Bytes::from_static(b"<fghijklm>"));
        let mut grown = Chunk::shared(&parts, 3..5);
        grown.push(Bytes::from_static(b">"));
        assert_eq!((grown.slice_count(), contents(&grown)), (3, b"ijklm>".to_vec()));
        assert!(Chunk::shared(&parts, 2..2).is_empty());
    }
}
