//! The compute pool: `threads - 1` workers plus the calling thread run the items of a
//! parallel loop.
//!
//! Between the operations of a step (microseconds apart) workers spin briefly so the next
//! operation starts at once; after [`SPIN`] without work they park, so an idle engine uses no
//! CPU. Items are claimed one at a time from an atomic counter: a worker that the OS
//! deschedules delays only the item it holds, never a barrier everyone waits at. The caller
//! waits for stragglers by spinning briefly, then yielding its core.
//!
//! The pool size is `TRELLIS_NUM_THREADS` when set; else, when vLLM's
//! `VLLM_CPU_OMP_THREADS_BIND` is a CPU list (`0-3`, `0,2,4-6`), one thread per listed CPU
//! this process may run on, each worker pinned to its CPU (the caller's thread keeps its own
//! mask); else (`auto`, `nobind`, unset) the cores this process may run on
//! (`std::thread::available_parallelism`, which honours affinity masks and cgroup quotas).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
pub const SPIN: Duration = Duration::from_micros(200);

/// A type-erased reference to the job of the current parallel loop.
#[derive(Clone, Copy)]
struct JobRef {
    data: *const (),
    call: unsafe fn(*const (), usize),
    items: usize,
}

// SAFETY: the pointee is a `Sync` closure that outlives every use (the caller of `run` waits
// until no worker holds the job before it returns).
unsafe impl Send for JobRef {}

struct Shared {
    /// Bumped once per parallel loop; workers compare with the last one they saw.
    generation: AtomicU64,
    job: Mutex<Option<JobRef>>,
    /// Next unclaimed item of the current loop.
    next: AtomicUsize,
    /// Workers currently inside the current loop's job.
    active: AtomicUsize,
    /// A job panicked.
    panicked: AtomicBool,
    shutdown: AtomicBool,
}

/// A pool of compute threads. Most code uses the process-wide [`global`] pool.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<Thread>,
    /// One parallel loop at a time (the engine thread is the only caller in practice).
    run_lock: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads())
            .finish()
    }
}

/// The number of threads the global pool uses.
pub fn default_threads() -> usize {
    if let Some(n) = std::env::var("TRELLIS_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    if let Some(cpus) = bind_cpus() {
        return cpus.len();
    }
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// Parses a Linux CPU list (`0-3,8,10-11`); `None` if it is not one.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim) {
        let (a, b): (usize, usize) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let a = part.parse().ok()?;
                (a, a)
            }
        };
        if a > b || b >= 1 << 16 {
            return None;
        }
        cpus.extend(a..=b);
    }
    cpus.sort_unstable();
    cpus.dedup();
    (!cpus.is_empty()).then_some(cpus)
}

/// The CPUs of `VLLM_CPU_OMP_THREADS_BIND` this process may run on, when it is a CPU list.
fn bind_cpus() -> Option<Vec<usize>> {
    let list = std::env::var("VLLM_CPU_OMP_THREADS_BIND").ok()?;
    let cpus = parse_cpu_list(&list)?;
    let allowed = affinity::allowed();
    let cpus: Vec<usize> = cpus
        .into_iter()
        .filter(|c| allowed.as_ref().is_none_or(|a| a.contains(c)))
        .collect();
    (!cpus.is_empty()).then_some(cpus)
}

/// The process-wide compute pool, created on first use with [`default_threads`] threads
/// (pinned to the CPUs of `VLLM_CPU_OMP_THREADS_BIND` when it lists them).
pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| match std::env::var_os("TRELLIS_NUM_THREADS") {
        None => match bind_cpus() {
            Some(cpus) => Pool::pinned(&cpus),
            None => Pool::new(default_threads()),
        },
        Some(_) => Pool::new(default_threads()),
    })
}

/// CPU affinity (Linux); elsewhere nothing is pinned.
mod affinity {
    /// The CPUs this process may run on, if the OS says.
    #[cfg(target_os = "linux")]
    pub fn allowed() -> Option<Vec<usize>> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            Some(
                (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| libc::CPU_ISSET(c, &set))
                    .collect(),
            )
        }
    }

    /// Pins the calling thread to `cpu`; false if the OS refused.
    #[cfg(target_os = "linux")]
    pub fn pin_current(cpu: usize) -> bool {
        // SAFETY: as above; the set holds one CPU below CPU_SETSIZE.
        unsafe {
            if cpu >= libc::CPU_SETSIZE as usize {
                return false;
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn allowed() -> Option<Vec<usize>> {
        None
    }

    #[cfg(not(target_os = "linux"))]
    pub fn pin_current(_cpu: usize) -> bool {
        false
    }
}

impl Pool {
    /// A pool that runs loops on `threads` threads in all (the caller included).
    pub fn new(threads: usize) -> Self {
        Self::build(threads, &[])
    }

    /// A pool of `cpus.len()` threads, worker `i` pinned to `cpus[i + 1]` (the first CPU is
    /// the caller's share; its thread is not pinned). A CPU the OS refuses is not pinned.
    pub fn pinned(cpus: &[usize]) -> Self {
        Self::build(cpus.len(), cpus.get(1..).unwrap_or_default())
    }

    fn build(threads: usize, pins: &[usize]) -> Self {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        });
        let workers = (1..threads.max(1))
            .filter_map(|i| {
                let s = shared.clone();
                let pin = pins.get(i - 1).copied();
                thread::Builder::new()
                    .name(format!("trellis-compute-{i}"))
                    .spawn(move || {
                        if let Some(cpu) = pin {
                            affinity::pin_current(cpu);
                        }
                        worker(&s)
                    })
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect();
        Pool {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    /// Threads that run a loop (workers and the caller).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i` in `0..items`, spread over the pool; returns when all are
    /// done. A panic in `f` is re-raised here after every item has finished or been skipped.
    pub fn run<F: Fn(usize) + Sync>(&self, items: usize, f: F) {
        if items == 0 {
            return;
        }
        if items == 1 || self.workers.is_empty() {
            (0..items).for_each(f);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        unsafe fn call<F: Fn(usize)>(data: *const (), i: usize) {
            // SAFETY: `data` is the `&F` published by `run`, alive until `run` returns.
            let f = unsafe { &*(data as *const F) };
            f(i)
        }
        let sh = &*self.shared;
        sh.next.store(0, Ordering::Relaxed);
        sh.panicked.store(false, Ordering::Relaxed);
        *sh.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobRef {
            data: &f as *const F as *const (),
            call: call::<F>,
            items,
        });
        sh.generation.fetch_add(1, Ordering::Release);
        for w in &self.workers {
            w.unpark();
        }
        // The caller works too.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            loop {
                let i = sh.next.fetch_add(1, Ordering::Relaxed);
                if i >= items {
                    break;
                }
                f(i);
            }
        }));
        if result.is_err() {
            // Let nobody start another item.
            sh.next.store(items, Ordering::Relaxed);
        }
        // Retract the job so that late workers never pick it up, then wait for those inside.
        *sh.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let start = Instant::now();
        let mut spins = 0u32;
        while sh.active.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 2000 && start.elapsed() < Duration::from_micros(50) {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
        if sh.panicked.load(Ordering::Relaxed) {
            panic!("a compute pool job panicked");
        }
    }

    /// Runs `f(range)` over `0..len` split into chunks of at least `min_chunk`, about four
    /// per thread for balance.
    pub fn run_chunked<F: Fn(std::ops::Range<usize>) + Sync>(
        &self,
        len: usize,
        min_chunk: usize,
        f: F,
    ) {
        let parts = (self.threads() * 4)
            .min(len.div_ceil(min_chunk.max(1)))
            .max(1);
        let chunk = len.div_ceil(parts);
        self.run(len.div_ceil(chunk.max(1)), |p| {
            let start = p * chunk;
            f(start..(start + chunk).min(len))
        });
    }

    /// Runs `f(first_row, rows)` over `data` cut into runs of whole rows of `width` elements:
    /// on the pool (about four runs per thread) when `data` has at least
    /// [`PAR_ROWS_MIN_ELEMS`] elements and more than one row, else as one run on the caller.
    /// Each run is a disjoint `&mut` part of `data`; `f` may read anything else by row index.
    ///
    /// # Panics
    /// When `width` is zero or `data.len()` is not a multiple of it (a caller bug).
    pub fn for_rows_mut<T: Send, F: Fn(usize, &mut [T]) + Sync>(
        &self,
        data: &mut [T],
        width: usize,
        f: F,
    ) {
        assert!(width > 0 && data.len().is_multiple_of(width), "row width");
        let rows = data.len() / width;
        if rows <= 1 || data.len() < PAR_ROWS_MIN_ELEMS || self.workers.is_empty() {
            f(0, data);
            return;
        }
        let per = rows.div_ceil(self.threads() * 4);
        let base = RowsPtr(data.as_mut_ptr());
        self.run(rows.div_ceil(per), |item| {
            let r0 = item * per;
            let n = per.min(rows - r0);
            // SAFETY: items cover disjoint row ranges inside `data`, which stays mutably
            // borrowed (and alive) until `run` returns.
            let part = unsafe { std::slice::from_raw_parts_mut(base.at(r0 * width), n * width) };
            f(r0, part)
        });
    }
}

/// Elements below which [`Pool::for_rows_mut`] runs on the caller: a parallel loop costs a
/// few microseconds, worth it only for prefill-sized row sets.
pub const PAR_ROWS_MIN_ELEMS: usize = 1 << 14;

/// A row pointer shared with the pool's threads by [`Pool::for_rows_mut`].
struct RowsPtr<T>(*mut T);
// SAFETY: only used to hand disjoint sub-slices of one `&mut [T]` (T: Send) to the threads.
unsafe impl<T: Send> Sync for RowsPtr<T> {}
impl<T> RowsPtr<T> {
    /// # Safety
    /// `off` is inside the slice the pointer came from.
    unsafe fn at(&self, off: usize) -> *mut T {
        // SAFETY: forwarded.
        unsafe { self.0.add(off) }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for w in &self.workers {
            w.unpark();
        }
    }
}

fn worker(sh: &Shared) {
    let mut seen = 0u64;
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        let generation = sh.generation.load(Ordering::Acquire);
        if generation != seen {
            seen = generation;
            // Enter under the job lock so that `run` cannot retract the job and return
            // between our read and our `active` increment.
            let job = {
                let g = sh.job.lock().unwrap_or_else(|e| e.into_inner());
                if g.is_some() {
                    sh.active.fetch_add(1, Ordering::AcqRel);
                }
                *g
            };
            if let Some(job) = job {
                let r = std::panic::catch_unwind(|| {
                    loop {
                        let i = sh.next.fetch_add(1, Ordering::Relaxed);
                        if i >= job.items {
                            break;
                        }
                        // SAFETY: the job is alive while `active` counts us.
                        unsafe { (job.call)(job.data, i) };
                    }
                });
                if r.is_err() {
                    sh.panicked.store(true, Ordering::Relaxed);
                    sh.next.store(job.items, Ordering::Relaxed);
                }
                sh.active.fetch_sub(1, Ordering::AcqRel);
            }
            idle_since = Instant::now();
            spins = 0;
            continue;
        }
        spins = spins.wrapping_add(1);
        // Reading the clock costs more than a spin: look at it every 64 spins only.
        if !spins.is_multiple_of(64) || idle_since.elapsed() < SPIN {
            std::hint::spin_loop();
        } else {
            // `unpark` before `park` makes `park` return at once: no lost wake-up.
            thread::park_timeout(Duration::from_millis(500));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_item_runs_once() {
        let pool = Pool::new(3);
        for items in [0usize, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicU32> = (0..items).map(|_| AtomicU32::new(0)).collect();
            pool.run(items, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn chunks_cover_the_range() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        pool.run_chunked(1001, 16, |r| {
            sum.fetch_add(r.map(|i| i + 1).sum::<usize>(), Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 1001 * 1002 / 2);
    }

    #[test]
    fn row_runs_cover_every_row_once() {
        let pool = Pool::new(3);
        for (rows, width) in [(1usize, 5usize), (3, 7), (100, 300), (1000, 64)] {
            let mut data = vec![0usize; rows * width];
            pool.for_rows_mut(&mut data, width, |r0, part| {
                for (i, row) in part.chunks_mut(width).enumerate() {
                    row.iter_mut().for_each(|v| *v += r0 + i + 1);
                }
            });
            for (r, row) in data.chunks(width).enumerate() {
                assert!(row.iter().all(|&v| v == r + 1), "rows {rows} width {width}");
            }
        }
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_still_works() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, |i| assert!(i != 40, "boom"));
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(64, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn idle_workers_park() {
        let pool = Pool::new(2);
        pool.run(8, |_| {});
        std::thread::sleep(SPIN * 20);
        // A parked pool still answers.
        let n = AtomicUsize::new(0);
        pool.run(8, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }
}

#[cfg(test)]
mod bind_tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_linux_writes_them() {
        assert_eq!(parse_cpu_list("0-3"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0,2, 4-5,2"), Some(vec![0, 2, 4, 5]));
        assert_eq!(parse_cpu_list("auto"), None);
        assert_eq!(parse_cpu_list("nobind"), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list(""), None);
    }

    #[test]
    fn a_pinned_pool_runs_every_item() {
        let cpus = affinity::allowed().unwrap_or_else(|| vec![0]);
        let pool = Pool::pinned(&cpus);
        assert_eq!(pool.threads(), cpus.len());
        let hits: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        pool.run(100, |i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }
}
