//! Local text corpora. (Being written.)
