//! The memory tenants' graphs may take while they run.
//!
//! A tenant's graph decides what ONNX Runtime allocates: `ConstantOfShape`, `Expand`, `Tile` or `Range`
//! fed from an input can ask for any size. Left to the system allocator, a run asking for more than the
//! machine has is not refused but killed by the kernel, and every tenant's server with it. So tenants'
//! sessions allocate from one arena of the environment's with a ceiling: past it an allocation fails,
//! ONNX Runtime fails the run, and the caller is told why. The platform's own graphs keep their own
//! allocators.
//!
//! Weights are not counted (ONNX Runtime keeps them apart from the arena); what a run allocates is. The
//! arena grows by what is asked, and each tenant's run gives back what it freed as it ends (see
//! [`SHRINK_AFTER_RUN`]), so a run's peak is not kept.
//!
//! `ort` does not wrap registering an environment allocator: this module calls ONNX Runtime's C API for
//! it, and is the one place in the workspace that uses `unsafe`.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char};

use ort::AsPointer;
use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::sys::{OrtArenaCfg, OrtStatusPtr};

/// The run option that has a run give its arena's free regions back to the system as it ends.
pub(crate) const SHRINK_AFTER_RUN: (&str, &str) = ("memory.enable_memory_arena_shrinkage", "cpu:0");

/// Registers the CPU arena that sessions built with `with_env_allocators` allocate from: at most
/// `max_bytes` at once, growing by what each allocation asks (not by powers of two, which would take
/// up to twice what is needed).
pub(crate) fn register(environment: &Environment, max_bytes: usize) -> Result<(), String> {
    let api = ort::api();
    let memory = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Arena,
        MemoryType::Default,
    )
    .map_err(|err| format!("memory info: {err}"))?;
    let keys: [*const c_char; 2] = [c"max_mem".as_ptr(), c"arena_extend_strategy".as_ptr()];
    // 1: kSameAsRequested.
    let values: [usize; 2] = [max_bytes, 1];
    let mut config: *mut OrtArenaCfg = std::ptr::null_mut();
    // SAFETY: `keys` and `values` are arrays of the length given, each key a NUL-terminated static
    // string; `config` is written by the call, and only read when it succeeded.
    let created =
        unsafe { (api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &raw mut config) };
    status(created)?;
    // SAFETY: the environment and the memory info are live for the call (ONNX Runtime copies what it
    // keeps of them), and `config` was created above; the environment takes no ownership of it.
    let registered = unsafe {
        (api.CreateAndRegisterAllocator)(environment.ptr().cast_mut(), memory.ptr(), config.cast_const())
    };
    // SAFETY: created above, released once, not used after.
    unsafe { (api.ReleaseArenaCfg)(config) };
    status(registered)
}

/// `Ok` for a null status; otherwise its message, and the status released.
fn status(status: OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from ONNX Runtime: its message is a NUL-terminated string owned by the
    // status, copied before the status is released (once).
    unsafe {
        let message = CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        Err(message)
    }
}

/// Whether ONNX Runtime's message says an allocation would have passed the arena's ceiling.
pub(crate) fn exhausted(message: &str) -> bool {
    message.contains("Available memory of") || message.contains("Failed to allocate memory")
}
