//! Micro-batches: packed blocks laid side by side as one `[rows, len]` forward pass, shorter
//! blocks padded at the end. Padding is a segment of its own, so no real token sees it, and it
//! is never a target.

use super::packing::PackedBlock;
use crate::ops::attention::Layout;

/// Segment id of padding (real segments count up from 0).
const PADDING: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[rows][len]`, padded with token 0.
    pub input_ids: Vec<Vec<u32>>,
    /// RoPE position of every token within its own packed row.
    pub positions: Vec<Vec<usize>>,
    /// Segment of every token: the packed row it belongs to, or padding.
    pub segments: Vec<Vec<u32>>,
    /// The trained positions as `(row · len + t, token)`: position `t` predicts token `t + 1`.
    pub targets: Vec<(usize, u32)>,
    /// Real (non-padding) tokens.
    pub tokens: usize,
}

impl Batch {
    pub fn new(blocks: &[&PackedBlock]) -> Self {
        let len = blocks.iter().map(|b| b.len()).max().unwrap_or(0);
        let mut batch = Batch { input_ids: Vec::new(), positions: Vec::new(), segments: Vec::new(), targets: Vec::new(), tokens: 0 };
        for (row, block) in blocks.iter().enumerate() {
            let padding = len - block.len();
            batch.input_ids.push(block.input_ids.iter().copied().chain(std::iter::repeat_n(0, padding)).collect());
            batch.positions.push(block.positions.iter().copied().chain(std::iter::repeat_n(0, padding)).collect());
            batch.segments.push(block.segments.iter().copied().chain(std::iter::repeat_n(PADDING, padding)).collect());
            batch.targets.extend(
                (1..block.len()).filter(|&t| block.trained[t]).map(|t| (row * len + t - 1, block.input_ids[t])),
            );
            batch.tokens += block.len();
        }
        batch
    }

    pub fn rows(&self) -> usize {
        self.input_ids.len()
    }

    pub fn len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Which token sees which (for [`crate::ops::attention`]).
    pub fn layout(&self) -> Layout {
        Layout::from_segments(&self.segments)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_its_own_segment_and_never_a_target() {
        let long = PackedBlock { input_ids: vec![5, 6, 7, 8], trained: vec![false, true, true, true], positions: vec![0, 1, 2, 3], segments: vec![0; 4] };
        let short = PackedBlock { input_ids: vec![1, 2], trained: vec![false, true], positions: vec![0, 1], segments: vec![0, 0] };
        let batch = Batch::new(&[&long, &short]);
        assert_eq!(batch.input_ids, vec![vec![5, 6, 7, 8], vec![1, 2, 0, 0]]);
        assert_eq!(batch.targets, vec![(0, 6), (1, 7), (2, 8), (4, 2)]);
        assert_eq!(batch.tokens, 6);
        let layout = batch.layout();
        assert!(layout.visible(1, 1, 0));
        assert!(!layout.visible(1, 2, 1), "padding sees only padding");
        assert!(layout.visible(1, 3, 2));
    }
}
