//! notion-projector
