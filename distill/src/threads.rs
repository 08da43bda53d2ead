//! Work spread over scoped threads: flex runs each element-wise operation on one thread, so
//! independent pieces of work (SwiGLU's chunks of tokens, data-parallel replicas on the
//! host) go side by side.

/// `work` on every item, each on a thread of its own when there are several; the results in
/// item order. A panic in one is raised again here.
pub fn side_by_side<I: Send, T: Send>(items: Vec<I>, work: impl Fn(I) -> T + Sync) -> Vec<T> {
    if items.len() <= 1 {
        return items.into_iter().map(work).collect();
    }
    std::thread::scope(|scope| {
        let work = &work;
        let running: Vec<_> = items.into_iter().map(|item| scope.spawn(move || work(item))).collect();
        running.into_iter().map(|thread| thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}
