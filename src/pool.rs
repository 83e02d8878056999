//! Where lowbit's parallel loops run, so that they work in a forked child.
//!
//! rayon's global pool is made of the threads of the process that first used it. `fork()`
//! copies only the calling thread: in a child (a `DataLoader` worker forked after the parent
//! calibrated, say) the global pool's queues still look alive but no thread serves them, and the
//! first parallel loop waits forever. The global pool cannot be rebuilt, so a child gets a pool
//! of its own and every core call of that process runs inside it (`ThreadPool::install`: the
//! loops in the call then use that pool). The process that owns the global pool keeps using it
//! directly, paying nothing for this. A fork is recognised by the process id, which needs no
//! at-fork hook (and so no handler that must be async-signal-safe).
use rayon::ThreadPool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The process whose threads make rayon's global pool.
static GLOBAL_OWNER: OnceLock<u32> = OnceLock::new();

/// A forked child's own pool, with the process it belongs to.
static CHILD_POOL: Mutex<Option<(u32, Arc<ThreadPool>)>> = Mutex::new(None);

fn child_pool(pid: u32) -> Arc<ThreadPool> {
    let mut slot = CHILD_POOL.lock().unwrap_or_else(|p| p.into_inner());
    match slot.take() {
        Some((owner, pool)) if owner == pid => {
            *slot = Some((owner, pool.clone()));
            pool
        }
        inherited => {
            // A pool inherited from the parent has no threads here: never drop it (its drop
            // would signal threads that do not exist), just forget it.
            std::mem::forget(inherited);
            let pool = Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .thread_name(|i| format!("lowbit-{i}"))
                    .build()
                    .expect("a thread pool for this forked process"),
            );
            *slot = Some((pid, pool.clone()));
            pool
        }
    }
}

/// Runs `f` where its parallel loops have threads: on the calling thread with rayon's global
/// pool in the process that owns it, inside a pool of the process's own after a fork.
/// Locks that `f`'s callers share must be taken before calling this, not inside `f`: inside a
/// pool a worker waiting in a parallel loop may run another call's job, which would then wait
/// for a lock its own thread holds.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pid = std::process::id();
    let owner = *GLOBAL_OWNER.get_or_init(|| {
        rayon::current_num_threads(); // starts the global pool here
        pid
    });
    if owner == pid {
        f()
    } else {
        child_pool(pid).install(f)
    }
}

/// Threads that `run`'s loops get in this process.
pub fn threads() -> usize {
    run(rayon::current_num_threads)
}

/// `chunk`-sized pieces of a slice, handed out to whichever thread asks first.
pub struct Pieces<'a, T> {
    xs: &'a [T],
    chunk: usize,
    next: &'a AtomicUsize,
}

impl<'a, T> Iterator for Pieces<'a, T> {
    type Item = &'a [T];
    fn next(&mut self) -> Option<&'a [T]> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let start = i.checked_mul(self.chunk)?;
        (start < self.xs.len()).then(|| &self.xs[start..(start + self.chunk).min(self.xs.len())])
    }
}

/// `f` run once on the calling thread and once on each of up to `threads() - 1` pool threads
/// (no more than there are pieces), each taking `chunk`-sized pieces of `xs` from one shared
/// queue until none are left; what each returned, in no particular order. The caller works
/// instead of sleeping until the pool's threads finish, which hides their wake-up; a pool thread
/// that wakes late takes fewer pieces instead of holding the caller up. For loops of a few
/// pieces called many times (observer batches), whose per-thread state (a histogram's counts)
/// costs something to set up and combine.
pub fn share_chunks<T: Sync, R: Send>(
    xs: &[T],
    chunk: usize,
    f: impl Fn(Pieces<'_, T>) -> R + Sync,
) -> Vec<R> {
    let chunk = chunk.max(1);
    let next = AtomicUsize::new(0);
    let pieces = || Pieces {
        xs,
        chunk,
        next: &next,
    };
    let helpers = rayon::current_num_threads()
        .min(xs.len().div_ceil(chunk))
        .saturating_sub(1);
    if helpers == 0 {
        return vec![f(pieces())];
    }
    let mut out: Vec<Option<R>> = (0..=helpers).map(|_| None).collect();
    let (head, tail) = out.split_first_mut().expect("at least two");
    let (f, pieces) = (&f, &pieces);
    rayon::in_place_scope(|s| {
        for o in tail.iter_mut() {
            s.spawn(move |_| *o = Some(f(pieces())));
        }
        *head = Some(f(pieces()));
    });
    out.into_iter()
        .map(|r| r.expect("every share ran"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element is handed out exactly once, in pieces of `chunk` (the last shorter), for
    /// inputs of no piece, one, and many.
    #[test]
    fn shared_pieces_cover_the_input_once() {
        for (n, chunk) in [
            (0usize, 4usize),
            (3, 4),
            (4, 4),
            (1000, 7),
            (1 << 16, 1 << 10),
        ] {
            let xs: Vec<usize> = (0..n).collect();
            let parts = share_chunks(&xs, chunk, |pieces| {
                pieces
                    .inspect(|p| assert!(!p.is_empty() && p.len() <= chunk))
                    .flatten()
                    .copied()
                    .collect::<Vec<_>>()
            });
            assert!(parts.len() <= threads().max(1));
            let mut seen: Vec<usize> = parts.concat();
            seen.sort_unstable();
            assert_eq!(seen, xs, "n = {n}, chunk = {chunk}");
        }
    }
}
