//! The process's heap keeps what it frees for reuse instead of handing it back to the kernel.
//!
//! A chunk's bytes pass through the heap on their way to the disk: the socket reads land in
//! buffers that live until the block is written, then are freed, and the next reads take new
//! ones. glibc's malloc maps large buffers (from 128 KiB, a threshold it raises as such
//! buffers are freed) on their own and unmaps them when freed, and returns the free top of a
//! heap to the kernel past `M_TRIM_THRESHOLD`; so nearly every buffer was fresh memory, and
//! every page of it a page fault and a page of zeroes on first touch. Measured here (4 GiB
//! from one client, `stitch-bench pace`): about 85 000 faults per GiB in the API, all in the
//! socket reads; with both settings below, under 2 000 per GiB. Raising the trim threshold
//! alone made it worse here (260 000 per GiB).
//!
//! What is kept is bounded by what the process held at once, which the body-memory budget
//! (`limits.max_buffered_body_bytes`) and the concurrency limits bound; past
//! [`KEEP_BYTES`] free at a heap's top, the excess is returned as before.

/// Free bytes at the top of a heap that malloc keeps rather than returns to the kernel.
pub const KEEP_BYTES: usize = 64 << 20;

/// Has malloc keep up to [`KEEP_BYTES`] of freed heap, and take buffers of up to 32 MiB from
/// its heaps rather than from mappings of their own. Call it first thing in `main`, before
/// threads start. Does nothing where malloc is not glibc's, or where the operator has tuned
/// malloc themselves (`GLIBC_TUNABLES` set): their setting stands.
pub fn keep_freed_memory() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    tune_malloc();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    const KEEP: libc::c_int = KEEP_BYTES as libc::c_int;
    const MMAP_BYTES: libc::c_int = 32 << 20;
    // SAFETY: mallopt(3) only reads its integer arguments and changes malloc's own settings,
    // which malloc reads under its locks.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_BYTES);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    #[allow(unsafe_code)]
    fn thread_faults() -> i64 {
        // SAFETY: getrusage(2) writes only into the struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_minflt
        }
    }

    /// Holds 16 MiB in buffers of `size` (socket reads are tens to hundreds of KiB), writes
    /// every page, frees them all.
    fn fill_and_free(size: usize) {
        let buffers: Vec<Vec<u8>> = (0..(16 << 20) / size)
            .map(|i| {
                let mut b = Vec::with_capacity(size);
                b.resize(size, i as u8);
                b
            })
            .collect();
        std::hint::black_box(&buffers);
    }

    #[test]
    fn memory_freed_is_taken_again_without_new_page_faults() {
        // A thread of its own: its own arena, and fault counts of its own.
        let faults = std::thread::spawn(|| {
            keep_freed_memory();
            [64 << 10, 512 << 10, 1 << 20].map(|size| {
                fill_and_free(size);
                let before = thread_faults();
                fill_and_free(size);
                (size, thread_faults() - before)
            })
        })
        .join()
        .unwrap();
        // Returned to the kernel, the second round faults in all 4096 pages again (seen: 4067
        // for 64 KiB buffers without the tuning). The mapping threshold's part shows only under
        // the API's pattern of reads, not here: the benchmark's fault counts cover it.
        for (size, faults) in faults {
            assert!(
                faults < 256,
                "{faults} page faults refilling 16 MiB of {size}-byte buffers just freed"
            );
        }
    }
}
