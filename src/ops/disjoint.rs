//! One output buffer written by parallel tasks, each to its own elements: the products'
//! and attention's tasks share it as a raw pointer.

/// A raw pointer that tasks writing disjoint parts of one buffer can share.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
// SAFETY: users only write disjoint elements from different threads (stated at each use).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// # Safety
    /// `offset + len` must lie inside the buffer, and no other thread may write the elements
    /// this task writes.
    pub(crate) unsafe fn slice<'a>(self, offset: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
}
