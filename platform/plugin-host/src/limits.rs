//! The sandbox's limits, per invocation unless noted.

use std::time::Duration;

/// Defaults follow the platform design; a plan may raise them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest component accepted at publishing.
    pub component_bytes: usize,
    /// Linear memory per instance.
    pub memory_bytes: usize,
    /// Wall-clock deadline of the whole invocation (instantiation, guest code, every host call):
    /// busy guest code is interrupted at the next epoch tick, a guest waiting in the host (a WASI
    /// sleep, a model call) is cancelled where it waits.
    pub deadline: Duration,
    /// Fuel per invocation: the compute budget, and what is reported as compute units.
    pub fuel: u64,
    pub input_bytes: usize,
    pub output_bytes: usize,
    /// Calls to hosted models per invocation.
    pub inference_calls: u32,
    /// Log bytes kept per invocation; a plugin that logs more is stopped.
    pub log_bytes: usize,
    pub kv_key_bytes: usize,
    pub kv_value_bytes: usize,
    /// Key-value calls per invocation: each is a round trip to the database (a set, a durable
    /// commit), shared with every tenant's requests.
    pub kv_calls: u32,
    /// Keys per installation.
    pub kv_keys: u64,
    /// Instances running at once across all plugins (the pooling allocator's size).
    pub concurrent_instances: u32,
    /// Threads that run paying tenants' guest code, at a lower scheduling priority than the threads
    /// that serve HTTP and run models, so plugin compute cannot starve them; three quarters as many
    /// more (at least one) run other tenants' guest code and compile components.
    pub threads: usize,
    /// Components compiled at once, for publishing and again for invoking (each has turns of its own,
    /// so publishing cannot hold up the plugins tenants call).
    pub compile_concurrency: usize,
    /// How long a compilation (waiting for its turn included) may take before the request is answered
    /// with an error; the compiler finishes in the background, still holding its turn.
    pub compile_timeout: Duration,
    /// Compiled components kept in memory, in bytes of their WebAssembly; the least recently used are
    /// dropped (and compiled again, from wasmtime's disk cache, when next invoked).
    pub compiled_cache_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // 32 MiB, not 16: a Python component (componentize-py bundles the interpreter) is ~18 MB.
            component_bytes: 32 << 20,
            memory_bytes: 64 << 20,
            deadline: Duration::from_secs(2),
            // About a minute of busy compute: the deadline normally stops a plugin first.
            fuel: 100_000_000_000,
            input_bytes: 1 << 20,
            output_bytes: 1 << 20,
            inference_calls: 8,
            log_bytes: 64 << 10,
            kv_key_bytes: 256,
            kv_value_bytes: 256 << 10,
            kv_calls: 100,
            kv_keys: 1_000,
            concurrent_instances: 64,
            threads: std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            compile_concurrency: 1,
            compile_timeout: Duration::from_secs(120),
            compiled_cache_bytes: 512 << 20,
        }
    }
}
