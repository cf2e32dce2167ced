//! A body chunk made of several byte slices, written with one vectored write.
//!
//! An answer from memory is mostly bytes the stores already hold: a list is
//! its objects between small separators, a watch's replay is each object
//! between an event's head and tail. Copying those into one contiguous
//! buffer per frame costs a pass over every byte of every answer (a
//! 10,000-pod list is 42 MB); sending each slice as its own body frame costs
//! a trip through every body layer per slice. A [`Chunk`] is the middle
//! way: one frame holding up to [`MAX_SLICES`] slices, which hyper hands to
//! the socket as one `writev` (its HTTP/1 write queue takes any
//! [`bytes::Buf`] and asks it for its slices). Only the small parts are
//! copied, see [`Builder`].

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;

use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;

use crate::upstream::FetchError;

/// A streamed answer from memory, chunk by chunk.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, FetchError>> + Send>>;

/// How many slices a [`Builder`] puts in one chunk: hyper writes at most 64
/// `iovec`s at once (`MAX_WRITEV_BUFS`), and a chunk goes out in one write.
pub const MAX_SLICES: usize = 64;

/// Bytes in one or more slices, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    /// The slice being written; empty only if the whole chunk is.
    first: Bytes,
    rest: VecDeque<Bytes>,
    remaining: usize,
}

impl Chunk {
    /// How many bytes are left.
    pub fn len(&self) -> usize {
        self.remaining
    }

    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// How many slices are left.
    pub fn slice_count(&self) -> usize {
        usize::from(!self.first.is_empty()) + self.rest.len()
    }

    /// The slices left, in order.
    pub fn slices(&self) -> impl Iterator<Item = &Bytes> {
        std::iter::once(&self.first)
            .filter(|first| !first.is_empty())
            .chain(&self.rest)
    }

    /// Appends `bytes` (nothing copied).
    pub fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.remaining += bytes.len();
        if self.first.is_empty() {
            self.first = bytes;
        } else {
            self.rest.push_back(bytes);
        }
    }

    /// Appends `other`'s slices (nothing copied).
    pub fn append(&mut self, other: Chunk) {
        let Chunk { first, rest, .. } = other;
        self.push(first);
        for slice in rest {
            self.push(slice);
        }
    }

    /// The bytes in one buffer: the slice itself if there is one, else a copy.
    pub fn into_bytes(mut self) -> Bytes {
        let len = self.remaining;
        self.copy_to_bytes(len)
    }
}

impl From<Bytes> for Chunk {
    fn from(bytes: Bytes) -> Chunk {
        let mut chunk = Chunk::default();
        chunk.push(bytes);
        chunk
    }
}

impl From<Vec<u8>> for Chunk {
    fn from(bytes: Vec<u8>) -> Chunk {
        Chunk::from(Bytes::from(bytes))
    }
}

impl From<&'static str> for Chunk {
    fn from(text: &'static str) -> Chunk {
        Chunk::from(Bytes::from_static(text.as_bytes()))
    }
}

impl Buf for Chunk {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        &self.first
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of a chunk");
        self.remaining -= cnt;
        while cnt > 0 {
            let step = cnt.min(self.first.len());
            self.first.advance(step);
            cnt -= step;
            if self.first.is_empty() {
                self.first = self.rest.pop_front().unwrap_or_default();
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
        if len <= self.first.len() {
            // Within one slice: shared, not copied.
            self.remaining -= len;
            let bytes = self.first.split_to(len);
            if self.first.is_empty() {
                self.first = self.rest.pop_front().unwrap_or_default();
            }
            return bytes;
        }
        assert!(len <= self.remaining, "copy_to_bytes past the end of a chunk");
        let mut out = BytesMut::with_capacity(len);
        out.extend_from_slice(&self.first);
        let mut left = len - self.first.len();
        self.remaining -= self.first.len();
        self.first = Bytes::new();
        while left > 0 {
            let mut slice = self
                .rest
                .pop_front()
                .expect("invariant: remaining counts the slices");
            let step = left.min(slice.len());
            out.extend_from_slice(&slice[..step]);
            slice.advance(step);
            left -= step;
            self.remaining -= step;
            if !slice.is_empty() {
                self.rest.push_front(slice);
            }
        }
        self.first = self.rest.pop_front().unwrap_or_default();
        out.freeze()
    }
}

/// Builds chunks from parts: parts shorter than `copy_below` are copied
/// together into one slice (a JSON separator is a byte or two, a protobuf
/// field header a few, and below a kilobyte or so a copy costs less than a
/// slice of its own); longer ones are kept as they are. A chunk is done at
/// [`MAX_SLICES`] slices, or once `copied_max` bytes were copied into it:
/// what a chunk held in a slow client's write queue costs beyond the
/// stores' own bytes.
#[derive(Debug)]
pub struct Builder {
    chunk: Chunk,
    /// Small parts copied since the last kept slice; its buffer is shared
    /// by the slices cut from it.
    glue: BytesMut,
    /// Bytes copied into the chunk being built.
    copied: usize,
    copy_below: usize,
    copied_max: usize,
}

impl Builder {
    pub fn new(copy_below: usize, copied_max: usize) -> Builder {
        Builder {
            chunk: Chunk::default(),
            glue: BytesMut::new(),
            copied: 0,
            copy_below,
            copied_max,
        }
    }

    /// Adds `part`; returns a chunk once one is done.
    pub fn push(&mut self, part: Bytes) -> Option<Chunk> {
        if part.len() < self.copy_below {
            if self.glue.capacity() - self.glue.len() < part.len() {
                self.glue.reserve(self.copy_below.max(4096).min(self.copied_max));
            }
            self.glue.extend_from_slice(&part);
            self.copied += part.len();
        } else {
            self.cut_glue();
            self.chunk.push(part);
        }
        let slices = self.chunk.slice_count() + usize::from(!self.glue.is_empty());
        // A kept part may be followed by glue: leave it a slot.
        (slices + 1 >= MAX_SLICES || self.copied >= self.copied_max).then(|| self.take())
    }

    /// What is left, if anything.
    pub fn finish(&mut self) -> Option<Chunk> {
        let chunk = self.take();
        (!chunk.is_empty()).then_some(chunk)
    }

    fn cut_glue(&mut self) {
        if !self.glue.is_empty() {
            let glue = self.glue.split().freeze();
            self.chunk.push(glue);
        }
    }

    fn take(&mut self) -> Chunk {
        self.cut_glue();
        self.copied = 0;
        std::mem::take(&mut self.chunk)
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

    #[test]
    fn builder_copies_small_parts_together_and_keeps_large_ones() {
        let large = Bytes::from(vec![b'x'; 100]);
        let mut builder = Builder::new(10, 1 << 20);
        let mut chunks = Vec::new();
        for _ in 0..200 {
            chunks.extend(builder.push(Bytes::from_static(b",{")));
            chunks.extend(builder.push(large.clone()));
        }
        chunks.extend(builder.finish());
        let mut expected = Vec::new();
        for _ in 0..200 {
            expected.extend_from_slice(b",{");
            expected.extend_from_slice(&large);
        }
        let sent: Vec<u8> = chunks.iter().flat_map(contents).collect();
        assert_eq!(sent, expected);
        for chunk in &chunks {
            assert!(chunk.slice_count() <= MAX_SLICES, "{}", chunk.slice_count());
            for slice in chunk.slices() {
                assert!(
                    slice.len() == 2 || slice.as_ptr() == large.as_ptr(),
                    "a large part is kept, not copied"
                );
            }
        }
        // 400 slices in chunks of at most 64: at least 7 chunks.
        assert!(chunks.len() >= 7 && chunks.len() <= 8, "{}", chunks.len());
        assert!(builder.finish().is_none());
    }

    #[test]
    fn builder_ends_a_chunk_once_it_copied_enough() {
        let mut builder = Builder::new(10, 1000);
        let mut chunks = Vec::new();
        for _ in 0..1000 {
            chunks.extend(builder.push(Bytes::from_static(b"abcd")));
        }
        chunks.extend(builder.finish());
        let sizes: Vec<usize> = chunks.iter().map(Chunk::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 4000);
        assert!(sizes[..sizes.len() - 1].iter().all(|&n| n == 1000), "{sizes:?}");
        assert!(
            chunks.iter().all(|c| c.slice_count() == 1),
            "small parts are one slice"
        );
    }
}
