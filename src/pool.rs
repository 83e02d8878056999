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

/// `f` of each `chunk`-sized piece of `xs`, in order, in parallel: the first piece on the
/// calling thread while the pool's threads take the others, so that a caller from outside the
/// pool (Python's thread) works instead of sleeping until they finish, and the pool's wake-up
/// is hidden behind its work. For loops of a few tasks, called many times (observer batches).
pub fn map_chunks<T: Sync, R: Send>(
    xs: &[T],
    chunk: usize,
    f: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    let mut pieces = xs.chunks(chunk.max(1));
    let Some(first) = pieces.next() else {
        return vec![];
    };
    let rest: Vec<&[T]> = pieces.collect();
    if rest.is_empty() {
        return vec![f(first)];
    }
    let mut out: Vec<Option<R>> = (0..=rest.len()).map(|_| None).collect();
    let (head, tail) = out.split_first_mut().expect("at least two pieces");
    let f = &f;
    rayon::in_place_scope(|s| {
        for (o, &p) in tail.iter_mut().zip(&rest) {
            s.spawn(move |_| *o = Some(f(p)));
        }
        *head = Some(f(first));
    });
    out.into_iter()
        .map(|r| r.expect("every piece ran"))
        .collect()
}
