//! The engine: compilation (cached on disk), the sandbox's limits, and one invocation from request to
//! response in a fresh instance.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter,
    Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::host::v0_1_0;
use crate::{CallContext, Capability, InvokeError, Limits, LogLine, PluginError, Services};

/// The world versions this host runs, oldest first.
pub const WIT_VERSIONS: &[&str] = &["0.1.0"];
const PACKAGE: &str = "plinth:plugin/";
/// Epoch tick: the deadline's resolution, and how often a busy plugin yields to other work.
const TICK: Duration = Duration::from_millis(10);
/// What a panicking guest may leave on stderr for the error message.
const STDERR_BYTES: usize = 4 << 10;

#[derive(Debug, Clone, Default)]
pub struct HostSettings {
    pub limits: Limits,
    /// Where compiled components are cached across restarts; `None` compiles on every start.
    pub cache_dir: Option<PathBuf>,
}

/// A component compiled and linked, ready to instantiate: one per plugin version.
pub struct Compiled {
    pre: v0_1_0::PluginPre<Invocation>,
    /// The host interfaces it imports.
    pub capabilities: Vec<Capability>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

/// A successful invocation.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub response: String,
    /// Fuel burnt: the compute units the call is reported with.
    pub compute_units: u64,
    pub logs: Vec<LogLine>,
    pub duration: Duration,
}

/// The state of one invocation: its sandbox and what it has used.
pub struct Invocation {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) call: Arc<CallContext>,
    pub(crate) services: Arc<dyn Services>,
    pub(crate) limits: Limits,
    pub(crate) inference_calls: u32,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) log_bytes: usize,
    /// The limit the plugin broke, when a host call or the limiter stopped it.
    pub(crate) breach: Option<String>,
    memory: MemoryCap,
}

impl std::fmt::Debug for Invocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invocation")
            .field("plugin", &self.call.plugin)
            .field("installation", &self.call.installation_id)
            .field("inference_calls", &self.inference_calls)
            .finish_non_exhaustive()
    }
}

impl WasiView for Invocation {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and tables, remembering a refusal so the trap that follows is explained.
struct MemoryCap {
    memory_bytes: usize,
    table_elements: usize,
    refused: Option<String>,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.refused = Some(format!(
                "the plugin asked for {} MiB of memory; the limit is {} MiB",
                desired >> 20,
                self.memory_bytes >> 20
            ));
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.refused = Some(format!(
                "the plugin's table grew past {} elements",
                self.table_elements
            ));
            return Ok(false);
        }
        Ok(true)
    }
}

/// Compiles, checks and runs plugins. One per process; cheap to share.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<Invocation>,
    limits: Limits,
    compiled: Mutex<HashMap<String, Arc<Compiled>>>,
    ticking: Arc<AtomicBool>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

impl PluginHost {
    /// Sets up the engine (pooling allocator, epoch interruption, fuel, disk cache) and the linker
    /// (sandboxed WASI: no files, no network, no environment; plus the world's host interfaces).
    ///
    /// # Errors
    /// When the engine or its cache cannot be set up.
    pub fn new(settings: &HostSettings) -> Result<Self, PluginError> {
        let limits = settings.limits;
        let engine_error = |err: wasmtime::Error| PluginError::Engine(format!("{err:#}"));
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(true)
            .max_wasm_stack(512 << 10);
        let slots = limits.concurrent_instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(slots)
            .total_stacks(slots)
            .total_core_instances(slots * 16)
            .max_core_instances_per_component(64)
            .total_memories(slots * 4)
            .max_memories_per_component(8)
            .total_tables(slots * 8)
            .max_tables_per_component(16)
            .max_memory_size(limits.memory_bytes)
            .max_unused_warm_slots(slots / 4);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        if let Some(dir) = &settings.cache_dir {
            // wasmtime's cache takes only an absolute directory; a relative one (the default data
            // directory is `./data`) is resolved against the working directory, as every other path is.
            let dir = std::path::absolute(dir).map_err(|err| {
                PluginError::Engine(format!("plugin cache directory {}: {err}", dir.display()))
            })?;
            let mut cache = CacheConfig::new();
            cache.with_directory(dir);
            config.cache(Some(Cache::new(cache).map_err(engine_error)?));
        }
        let engine = Engine::new(&config).map_err(engine_error)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_error)?;
        v0_1_0::Plugin::add_to_linker::<Invocation, wasmtime::component::HasSelf<Invocation>>(
            &mut linker,
            |state| state,
        )
        .map_err(engine_error)?;

        // The epoch clock: a thread ticks every 10 ms while the host lives.
        let ticking = Arc::new(AtomicBool::new(true));
        let weak = engine.weak();
        let alive = ticking.clone();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while alive.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .map_err(|err| PluginError::Engine(err.to_string()))?;

        Ok(Self {
            engine,
            linker,
            limits,
            compiled: Mutex::new(HashMap::new()),
            ticking,
        })
    }

    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles (or finds, by content hash) a component and checks that it fits the world: it must
    /// export the handler and import nothing but sandboxed WASI and the world's interfaces.
    ///
    /// # Errors
    /// An invalid or oversized component, or one the world cannot satisfy.
    pub fn compile(&self, sha256: &str, bytes: &[u8]) -> Result<Arc<Compiled>, PluginError> {
        if let Some(found) = self.cached(sha256) {
            return Ok(found);
        }
        if bytes.len() > self.limits.component_bytes {
            return Err(PluginError::Invalid(format!(
                "the component is {} bytes; the limit is {} MiB",
                bytes.len(),
                self.limits.component_bytes >> 20
            )));
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|err| PluginError::Invalid(format!("not a valid WebAssembly component: {err:#}")))?;
        let mut capabilities = Vec::new();
        for (name, _) in component.component_type().imports(&self.engine) {
            if name.starts_with("wasi:") {
                continue;
            }
            let interface = name
                .strip_prefix(PACKAGE)
                .and_then(|rest| rest.split_once('@'))
                .map(|(interface, _)| interface);
            match Capability::ALL.iter().find(|c| Some(c.interface()) == interface) {
                Some(capability) => capabilities.push(*capability),
                None => {
                    return Err(PluginError::Incompatible(format!(
                        "the component imports `{name}`, which plugins cannot use"
                    )));
                }
            }
        }
        let instance = self.linker.instantiate_pre(&component).map_err(|err| {
            PluginError::Incompatible(format!(
                "the component does not fit the plinth:plugin world: {err:#}"
            ))
        })?;
        let pre = v0_1_0::PluginPre::new(instance).map_err(|err| {
            PluginError::Incompatible(format!(
                "the component does not export plinth:plugin/handler@0.1.0: {err:#}"
            ))
        })?;
        capabilities.sort();
        capabilities.dedup();
        let compiled = Arc::new(Compiled { pre, capabilities });
        self.compiled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(sha256.to_owned(), compiled.clone());
        Ok(compiled)
    }

    /// A component compiled earlier in this process.
    #[must_use]
    pub fn cached(&self, sha256: &str) -> Option<Arc<Compiled>> {
        self.compiled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(sha256)
            .cloned()
    }

    /// Drops a compiled component from this process's cache (a revoked version's: the next
    /// installation to run the same bytes, if any, compiles them again).
    pub fn forget(&self, sha256: &str) {
        self.compiled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(sha256);
    }

    /// Runs one invocation in a fresh instance under every limit.
    ///
    /// # Errors
    /// See [`InvokeError`]: each limit breach, trap or plugin error has its own variant.
    pub async fn invoke(
        &self,
        compiled: &Compiled,
        call: Arc<CallContext>,
        services: Arc<dyn Services>,
        request: &str,
    ) -> Result<Outcome, InvokeError> {
        let limits = self.limits;
        if request.len() > limits.input_bytes {
            return Err(InvokeError::LimitExceeded(format!(
                "the request is {} bytes; plugins accept at most {} KiB",
                request.len(),
                limits.input_bytes >> 10
            )));
        }
        let started = Instant::now();
        let stderr = MemoryOutputPipe::new(STDERR_BYTES);
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut store = Store::new(
            &self.engine,
            Invocation {
                wasi,
                table: ResourceTable::new(),
                call,
                services,
                limits,
                inference_calls: 0,
                logs: Vec::new(),
                log_bytes: 0,
                breach: None,
                memory: MemoryCap {
                    memory_bytes: limits.memory_bytes,
                    table_elements: 100_000,
                    refused: None,
                },
            },
        );
        store.limiter(|state| &mut state.memory);
        store
            .set_fuel(limits.fuel)
            .map_err(|err| InvokeError::Unavailable(err.to_string()))?;
        // Yield to the runtime every tick, so a busy plugin never starves other requests; stop it
        // at the deadline.
        let deadline = started + limits.deadline;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });

        let outcome = async {
            let plugin = compiled.pre.instantiate_async(&mut store).await?;
            plugin
                .plinth_plugin_handler()
                .call_handle(&mut store, request)
                .await
        }
        .await;
        let compute_units = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let duration = started.elapsed();
        let state = store.into_data();
        metrics::histogram!("plinth_plugin_invocation_seconds", "plugin" => state.call.plugin.clone())
            .record(duration.as_secs_f64());
        let explain = |err: &wasmtime::Error| explain_trap(err, &state, &stderr, limits);
        match outcome {
            Ok(Ok(response)) if response.len() > limits.output_bytes => {
                Err(InvokeError::LimitExceeded(format!(
                    "the plugin answered {} bytes; the limit is {} KiB",
                    response.len(),
                    limits.output_bytes >> 10
                )))
            }
            Ok(Ok(response)) => Ok(Outcome {
                response,
                compute_units,
                logs: state.logs,
                duration,
            }),
            Ok(Err(v0_1_0::exports::plinth::plugin::handler::Error::InvalidRequest(message))) => {
                Err(InvokeError::Rejected(message))
            }
            Ok(Err(v0_1_0::exports::plinth::plugin::handler::Error::Failed(message))) => {
                Err(InvokeError::Failed(message))
            }
            Err(err) => Err(explain(&err)),
        }
    }
}

/// Turns a trap into the error the caller sees, naming the limit when one was the cause.
fn explain_trap(
    err: &wasmtime::Error,
    state: &Invocation,
    stderr: &MemoryOutputPipe,
    limits: Limits,
) -> InvokeError {
    if let Some(breach) = &state.breach {
        return InvokeError::LimitExceeded(breach.clone());
    }
    if let Some(refused) = &state.memory.refused {
        return InvokeError::LimitExceeded(refused.clone());
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => InvokeError::Timeout(format!(
            "the plugin ran past its {} ms deadline and was stopped",
            limits.deadline.as_millis()
        )),
        Some(Trap::OutOfFuel) => InvokeError::LimitExceeded(format!(
            "the plugin used its whole compute budget ({} units)",
            limits.fuel
        )),
        Some(Trap::StackOverflow) => InvokeError::Failed("the plugin overflowed its stack".to_owned()),
        Some(Trap::AllocationTooLarge) => InvokeError::LimitExceeded(format!(
            "the plugin asked for more than its {} MiB of memory",
            limits.memory_bytes >> 20
        )),
        Some(trap) => {
            let said = String::from_utf8_lossy(&stderr.contents()).trim().to_owned();
            // A Rust panic prints its message, then a note about backtraces: keep the message.
            let said = said
                .lines()
                .rfind(|line| !line.starts_with("note:"))
                .unwrap_or_default()
                .to_owned();
            if said.is_empty() {
                InvokeError::Failed(format!("the plugin trapped: {trap}"))
            } else {
                InvokeError::Failed(format!("the plugin trapped: {trap}: {said}"))
            }
        }
        None if err.to_string().contains("instance") && err.to_string().contains("limit") => {
            InvokeError::Unavailable("every plugin instance slot is busy; retry shortly".to_owned())
        }
        None => InvokeError::Failed(format!("the plugin could not run: {err:#}")),
    }
}
