//! SQLite's heap, configured once per process before its first connection.
//!
//! Why: sqlx binds every text parameter as `SQLITE_TRANSIENT`, so SQLite
//! copies each one into memory of its own, and its default allocator is
//! glibc's `malloc` behind a global mutex that keeps memory statistics.
//! Under ingestion that was ~14 % of the SQLite writer thread, the thread
//! every group commit runs on. Here SQLite allocates through Rust's global
//! allocator (the binary's mimalloc, thread-local and lock-free) and keeps
//! no statistics (Flywheel reads none; `sqlite3_memory_used` reports 0).
//!
//! Invariants:
//! * [`configure`] runs before SQLite is initialised, or changes nothing:
//!   `sqlite3_config` refuses (`SQLITE_MISUSE`) once any connection has
//!   been opened, so memory SQLite allocated earlier is never freed by a
//!   different allocator. `SqliteStore::open` calls it first, and every
//!   SQLite connection of the process is opened there; `sqlite3_config` must
//!   not race another thread's SQLite call, and the `OnceLock` makes
//!   concurrent first opens wait for it.
//! * Every block starts with a header holding its requested size, so
//!   `xFree`, `xRealloc` and `xSize` can rebuild its `Layout`; blocks are
//!   aligned to `ALIGN`, more than the 8 bytes SQLite requires.

// The one module of the library that may use `unsafe` (its test,
// tests/sqlite_heap.rs, reads a counter): SQLite's C configuration API and
// the allocation hooks it calls. Each block says what it relies on.
#![allow(unsafe_code)]

use std::alloc::{alloc, dealloc, realloc, Layout};
use std::os::raw::{c_int, c_void};
use std::sync::OnceLock;

use libsqlite3_sys as ffi;

/// The header before each block: its requested size, padded to `ALIGN`.
const HEADER: usize = 16;
const ALIGN: usize = 16;

/// What [`configure`] did, for the log and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Configured {
    /// SQLite allocates through Rust's global allocator, without statistics.
    RustAllocator,
    /// SQLite was initialised before [`configure`] ran: its defaults stay.
    TooLate,
}

static OUTCOME: OnceLock<Configured> = OnceLock::new();

/// Routes SQLite's allocations through Rust's global allocator, once per
/// process; later calls return the first call's outcome.
pub fn configure() -> Configured {
    *OUTCOME.get_or_init(|| {
        let outcome = configure_now();
        match outcome {
            Configured::RustAllocator => {
                tracing::debug!("SQLite allocates through the global allocator")
            }
            Configured::TooLate => tracing::debug!(
                "SQLite was initialised before its allocator could be set; its default stays"
            ),
        }
        outcome
    })
}

fn configure_now() -> Configured {
    let methods = ffi::sqlite3_mem_methods {
        xMalloc: Some(x_malloc),
        xFree: Some(x_free),
        xRealloc: Some(x_realloc),
        xSize: Some(x_size),
        xRoundup: Some(x_roundup),
        xInit: Some(x_init),
        xShutdown: Some(x_shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: `sqlite3_config` is only unsafe to call while SQLite is being
    // initialised or used on another thread; before initialisation it is a
    // plain assignment, and afterwards it returns SQLITE_MISUSE and changes
    // nothing. The statistics switch goes first: if it is refused, SQLite
    // is already running and the allocator must not change either. SQLite
    // copies `methods` before returning.
    unsafe {
        if ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0 as c_int) != ffi::SQLITE_OK {
            return Configured::TooLate;
        }
        if ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_MALLOC,
            &methods as *const ffi::sqlite3_mem_methods,
        ) != ffi::SQLITE_OK
        {
            return Configured::TooLate;
        }
    }
    Configured::RustAllocator
}

fn layout_for(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(HEADER)?, ALIGN).ok()
}

/// The block's start and its requested size, from the pointer SQLite holds.
///
/// # Safety
/// `block` was returned by `x_malloc` or `x_realloc` and not freed since.
unsafe fn header_of(block: *mut c_void) -> (*mut u8, usize) {
    let base = (block as *mut u8).sub(HEADER);
    (base, (base as *const usize).read())
}

unsafe extern "C" fn x_malloc(size: c_int) -> *mut c_void {
    let Some(layout) = usize::try_from(size).ok().and_then(layout_for) else {
        return std::ptr::null_mut();
    };
    // SAFETY: the layout is at least HEADER bytes, never zero-sized.
    let base = alloc(layout);
    if base.is_null() {
        return std::ptr::null_mut();
    }
    (base as *mut usize).write(layout.size() - HEADER);
    base.add(HEADER) as *mut c_void
}

unsafe extern "C" fn x_free(block: *mut c_void) {
    if block.is_null() {
        return;
    }
    // SAFETY: SQLite frees only what its xMalloc/xRealloc returned.
    let (base, size) = header_of(block);
    dealloc(
        base,
        Layout::from_size_align_unchecked(size + HEADER, ALIGN),
    );
}

unsafe extern "C" fn x_realloc(block: *mut c_void, size: c_int) -> *mut c_void {
    if block.is_null() {
        return x_malloc(size);
    }
    let Some(new_layout) = usize::try_from(size).ok().and_then(layout_for) else {
        return std::ptr::null_mut();
    };
    // SAFETY: as in `x_free`; on failure the old block stays valid, which
    // is what SQLite expects of xRealloc.
    let (base, old) = header_of(block);
    let moved = realloc(
        base,
        Layout::from_size_align_unchecked(old + HEADER, ALIGN),
        new_layout.size(),
    );
    if moved.is_null() {
        return std::ptr::null_mut();
    }
    (moved as *mut usize).write(new_layout.size() - HEADER);
    moved.add(HEADER) as *mut c_void
}

unsafe extern "C" fn x_size(block: *mut c_void) -> c_int {
    if block.is_null() {
        return 0;
    }
    // SAFETY: as in `x_free`. Sizes came from a c_int, so they fit one.
    header_of(block).1 as c_int
}

unsafe extern "C" fn x_roundup(size: c_int) -> c_int {
    // SQLite asks before allocating; 8-byte multiples keep its arithmetic
    // on sizes exact. It never asks for 0x7fffff00 bytes or more (its
    // sqlite3Malloc refuses those first), so saturating only guards against
    // overflow and never rounds a real request down.
    size.saturating_add(7) & !7
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_keep_their_size_through_realloc_and_are_aligned() {
        // The hooks are plain functions: exercised directly, whatever
        // SQLite itself was configured with in this test process.
        unsafe {
            let block = x_malloc(24);
            assert!(!block.is_null());
            assert_eq!(block as usize % 8, 0);
            assert_eq!(x_size(block), 24);
            std::ptr::write_bytes(block as *mut u8, 0xAB, 24);
            let grown = x_realloc(block, 4000);
            assert_eq!(x_size(grown), 4000);
            assert_eq!(
                *(grown as *const u8).add(23),
                0xAB,
                "contents move with the block"
            );
            let shrunk = x_realloc(grown, 8);
            assert_eq!(x_size(shrunk), 8);
            x_free(shrunk);
            x_free(std::ptr::null_mut());
            assert_eq!(x_size(std::ptr::null_mut()), 0);
            assert!(
                x_malloc(-1).is_null(),
                "a negative size is refused, not wrapped"
            );
            assert_eq!(x_roundup(13), 16);
            assert_eq!(x_roundup(16), 16);
            assert_eq!(
                x_roundup(0x7fff_fef9),
                0x7fff_ff00,
                "the largest size SQLite asks for"
            );
            assert!(x_roundup(c_int::MAX) > 0, "no overflow past SQLite's range");
        }
    }
}
