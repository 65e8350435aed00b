//! Shared libraries loaded at run time, in one place over `libloading`: libtorch's CUDA half, NCCL, and
//! symbols of libraries the process has already loaded (the CUDA driver and runtime). Every library hasten
//! opens stays loaded for the life of the process: libtorch's CUDA hooks must stay registered and NCCL's
//! threads outlive any handle, so closing one would pull code out from under them.

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use std::ffi::OsStr;
use std::sync::OnceLock;

/// A library loaded for the rest of the process (or the process's global scope).
#[derive(Clone, Copy)]
pub struct Loaded(&'static Library);

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Loaded(..)")
    }
}

impl Loaded {
    /// Loads `path` (a path, or a name the dynamic linker searches for) with its symbols made global
    /// (`RTLD_NOW | RTLD_GLOBAL`), as a library other libraries resolve against must be. The error is the
    /// dynamic linker's own message, which names the file and what is missing.
    pub fn open_global(path: impl AsRef<OsStr>) -> Result<Loaded, String> {
        // SAFETY: loading runs the library's initialisers. hasten loads libtorch's own libtorch_cuda and
        // NCCL (the copy libtorch_cuda already loaded, else the torch install's, else libnccl.so.2 from
        // the linker's path), libraries whose initialisers are made to run in a process linking libtorch.
        let library = unsafe { Library::open(Some(path.as_ref()), RTLD_NOW | RTLD_GLOBAL) }
            .map_err(describe)?;
        Ok(Loaded(Box::leak(Box::new(library))))
    }

    /// The libraries the process has loaded already, searched in the dynamic linker's default order
    /// (`RTLD_DEFAULT`): how the CUDA runtime that libtorch links is reached without naming its file.
    pub fn process() -> Loaded {
        static DEFAULT: OnceLock<Library> = OnceLock::new();
        // SAFETY: RTLD_DEFAULT is the pseudo-handle dlsym accepts for "the global scope"; it is never
        // closed because the static is never dropped.
        Loaded(DEFAULT.get_or_init(|| unsafe { Library::from_raw(libc::RTLD_DEFAULT) }))
    }

    /// `name` if the process has loaded it already, without loading it (`RTLD_NOLOAD`).
    pub fn already_loaded(name: impl AsRef<OsStr>) -> Option<Loaded> {
        // SAFETY: with RTLD_NOLOAD nothing is loaded and no initialiser runs; the handle only adds a
        // reference to a library already mapped, kept like every other.
        let library =
            unsafe { Library::open(Some(name.as_ref()), RTLD_NOW | libc::RTLD_NOLOAD) }.ok()?;
        Some(Loaded(Box::leak(Box::new(library))))
    }

    /// The function `name` of this library, as a pointer of type `F`.
    ///
    /// # Safety
    /// `F` must be an `unsafe extern "C" fn` type with the symbol's exact C signature.
    pub unsafe fn function<F: Copy>(self, name: &str) -> Result<F, String> {
        assert_eq!(
            std::mem::size_of::<F>(),
            std::mem::size_of::<*mut std::ffi::c_void>(),
            "a function pointer type"
        );
        // SAFETY: looking the address up as a plain pointer; the library is never closed.
        let address = unsafe { self.0.get::<*mut std::ffi::c_void>(name.as_bytes()) }
            .map_err(|e| format!("symbol {name} not found: {}", describe(e)))?;
        // dlsym may succeed with a null address (a symbol whose value is 0): never a function.
        if address.is_null() {
            return Err(format!("symbol {name} has a null address"));
        }
        // SAFETY: a non-null function address of the signature the caller vouches for (F is
        // pointer-sized, checked above).
        Ok(unsafe { std::mem::transmute_copy::<*mut std::ffi::c_void, F>(&*address) })
    }
}

/// The dynamic linker's own message (libloading's Display says only "dlopen failed"; the text of
/// `dlerror`, which names the file and what is missing, is its source).
fn describe(e: libloading::Error) -> String {
    use std::error::Error as _;
    e.source()
        .map_or_else(|| e.to_string(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_scope_finds_libc_and_a_missing_library_is_named() {
        type Getpid = unsafe extern "C" fn() -> libc::pid_t;
        // SAFETY: getpid's C signature.
        let getpid: Getpid = unsafe { Loaded::process().function("getpid") }.unwrap();
        // SAFETY: getpid has no preconditions.
        assert_eq!(unsafe { getpid() } as u32, std::process::id());
        // SAFETY: a signature that is never called.
        let missing = unsafe { Loaded::process().function::<Getpid>("no_such_symbol_here") };
        assert!(missing.unwrap_err().contains("no_such_symbol_here"));
        let err = Loaded::open_global("/nonexistent/libnothing.so").unwrap_err();
        assert!(err.contains("libnothing.so"), "{err}");
        assert!(Loaded::already_loaded("libnothing-at-all.so.9").is_none());
    }
}
