//! The engine: compilation (cached on disk), the sandbox's limits, and one invocation from request to
//! response in a fresh instance.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Cache, CacheConfig, CallHook, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
    ResourceLimiter, Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::host::v0_1_0;
use crate::occupancy::{Occupancy, Seat};
use crate::turns::{Guest, Turns};
use crate::{CallContext, Capability, InvokeError, Limits, LogLine, PluginError, Services};

/// The world versions this host runs, oldest first.
pub const WIT_VERSIONS: &[&str] = &["0.1.0"];
const PACKAGE: &str = "plinth:plugin/";
/// Epoch tick: the deadline's resolution, and how often a busy plugin yields to other work.
const TICK: Duration = Duration::from_millis(10);
/// What a panicking guest may leave on stderr for the error message.
const STDERR_BYTES: usize = 4 << 10;
/// The niceness of the threads that run guest code and compile components: well below the threads
/// that serve HTTP and models (0), so a storm of busy plugins gets the CPU those leave over.
const PLUGIN_NICENESS: i32 = 10;

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
    /// Bytes of WebAssembly it was compiled from (what the in-memory cache weighs).
    size: usize,
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
    pub(crate) kv_calls: u32,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) log_bytes: usize,
    /// The limit the plugin broke, when a host call or the limiter stopped it.
    pub(crate) breach: Option<String>,
    memory: MemoryCap,
    /// Its turn on the plugin threads, given back when the invocation ends.
    turn: Guest,
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

/// Caps linear memory, all of an instance's memories together, and tables, remembering a refusal so
/// the trap that follows is explained.
struct MemoryCap {
    memory_bytes: usize,
    /// The bytes of every memory the invocation has created, as they grew.
    in_use: usize,
    table_elements: usize,
    refused: Option<String>,
}

impl ResourceLimiter for MemoryCap {
    /// Asked for each memory as it is created (from 0) and each time it grows.
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.in_use.saturating_sub(current).saturating_add(desired);
        if total > self.memory_bytes {
            self.refused = Some(format!(
                "the plugin asked for {} MiB of memory; the limit is {} MiB",
                total >> 20,
                self.memory_bytes >> 20
            ));
            return Ok(false);
        }
        self.in_use = total;
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
    linker: Arc<Linker<Invocation>>,
    limits: Limits,
    /// Components that passed the publishing checks, by SHA-256, least recently used dropped first.
    compiled: moka::future::Cache<String, Arc<Compiled>>,
    /// Turns to compile new versions being published (unreviewed code, as large and slow to compile
    /// as an author makes it).
    publishing: Arc<Semaphore>,
    /// Turns to compile versions being invoked: apart from publishing's, so that authors publishing
    /// cannot hold up a tenant's plugin that must be compiled again (first call on a replica, or let
    /// go from the cache).
    loading: Arc<Semaphore>,
    occupancy: Arc<Occupancy>,
    /// Where compilation and the guest code of tenants without a paid plan run: threads of their
    /// own, at a lower priority, three quarters as many as `Limits::threads`.
    pool: tokio::runtime::Handle,
    /// Where paying tenants' guest code runs: as many threads again, at the same priority. The
    /// tenants on one set of threads share it by turns (see [`Turns`]), so a crowd of free accounts
    /// would still leave each paying tenant only its share of the shared threads; on threads of its
    /// own it shares them with the other paying tenants alone.
    paying_pool: tokio::runtime::Handle,
    /// The turns of each set of threads.
    turns: Arc<Turns>,
    paying_turns: Arc<Turns>,
    /// Own those threads; taken only on drop.
    threads: Option<tokio::runtime::Runtime>,
    paying_threads: Option<tokio::runtime::Runtime>,
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
        // Running invocations are cancelled with them; nothing of theirs outlives the host.
        for pool in [self.threads.take(), self.paying_threads.take()]
            .into_iter()
            .flatten()
        {
            pool.shutdown_background();
        }
    }
}

/// Lowers the calling thread's scheduling priority (Linux: a thread's niceness is its own).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(err) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), PLUGIN_NICENESS) {
        tracing::warn!(error = %err, "could not lower the priority of a plugin thread");
    }
}

/// Aborts a spawned task when the caller stops waiting for it (a client that hung up).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
            // One core per compilation, on the plugin threads: a large component must not take every
            // core from the requests being served.
            .parallel_compilation(false)
            .max_wasm_stack(512 << 10);
        let slots = limits.concurrent_instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        // A component may take no more of the pool's parts than a slot's share of them: a tenant's
        // instances then hold at most their share of the pool, whatever their components are made of.
        pool.total_component_instances(slots)
            .total_stacks(slots)
            .total_core_instances(slots * CORE_INSTANCES_PER_SLOT)
            .max_core_instances_per_component(CORE_INSTANCES_PER_SLOT)
            .total_memories(slots * MEMORIES_PER_SLOT)
            .max_memories_per_component(MEMORIES_PER_SLOT)
            .total_tables(slots * TABLES_PER_SLOT)
            .max_tables_per_component(TABLES_PER_SLOT)
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

        let threads = |name: &str, workers: usize, blocking: usize| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .max_blocking_threads(blocking)
                .thread_name(name)
                .on_thread_start(lower_priority)
                .enable_all()
                .build()
                .map_err(|err| PluginError::Engine(format!("plugin threads: {err}")))
        };
        // Both kinds of compilation at their limits, and a little room.
        let pool = threads(
            "plugin",
            unpaid_threads(&limits),
            2 * limits.compile_concurrency.max(1) + 2,
        )?;
        let paying_pool = threads("plugin-paying", limits.threads.max(1), 1)?;
        let compiled = moka::future::Cache::builder()
            .max_capacity(limits.compiled_cache_bytes)
            .weigher(|_, compiled: &Arc<Compiled>| u32::try_from(compiled.size).unwrap_or(u32::MAX))
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            limits,
            compiled,
            publishing: Arc::new(Semaphore::new(limits.compile_concurrency.max(1))),
            loading: Arc::new(Semaphore::new(limits.compile_concurrency.max(1))),
            occupancy: Arc::default(),
            pool: pool.handle().clone(),
            paying_pool: paying_pool.handle().clone(),
            turns: Turns::new(unpaid_threads(&limits)),
            paying_turns: Turns::new(limits.threads.max(1)),
            threads: Some(pool),
            paying_threads: Some(paying_pool),
            ticking,
        })
    }

    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles a component being published and checks that it fits the world: it must export the
    /// handler and import nothing but sandboxed WASI and the world's interfaces. Compilation takes its
    /// turn among publishing's (a bounded number at once) on the plugin threads; nothing is cached
    /// (see [`Self::load`]).
    ///
    /// # Errors
    /// An invalid or oversized component, one the world cannot satisfy, or [`PluginError::Busy`] when
    /// compiling (waiting for a turn included) takes longer than the limit.
    pub async fn compile(&self, bytes: Vec<u8>) -> Result<Arc<Compiled>, PluginError> {
        self.compile_in_turn(&self.publishing, bytes).await
    }

    async fn compile_in_turn(
        &self,
        turns: &Arc<Semaphore>,
        bytes: Vec<u8>,
    ) -> Result<Arc<Compiled>, PluginError> {
        if bytes.len() > self.limits.component_bytes {
            return Err(PluginError::Invalid(format!(
                "the component is {} bytes; the limit is {} MiB",
                bytes.len(),
                self.limits.component_bytes >> 20
            )));
        }
        let timeout = self.limits.compile_timeout;
        let too_slow = || {
            PluginError::Busy(format!(
                "compiling the component took longer than {} s; retry later",
                timeout.as_secs()
            ))
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let turn = tokio::time::timeout_at(deadline, turns.clone().acquire_owned())
            .await
            .map_err(|_| too_slow())?
            .map_err(|_| PluginError::Engine("the compiler was shut down".to_owned()))?;
        let (engine, linker) = (self.engine.clone(), self.linker.clone());
        let compiling = self.pool.spawn_blocking(move || {
            // The turn is held until the compiler is done, even when the caller stopped waiting.
            let _turn = turn;
            check(&engine, &linker, &bytes)
        });
        tokio::time::timeout_at(deadline, compiling)
            .await
            .map_err(|_| too_slow())?
            .map_err(|err| PluginError::Engine(format!("the compiler failed: {err}")))?
            .map(Arc::new)
    }

    /// A component kept compiled, or compiled from `read()` and kept (the components of versions
    /// being invoked: a version published and not yet approved is not kept, so an author publishing
    /// many cannot push approved plugins out); concurrent callers for the same component share one
    /// compilation, which takes its turn apart from publishing's.
    ///
    /// # Errors
    /// As [`Self::compile`], or when the bytes cannot be read.
    pub async fn load<F>(&self, sha256: &str, read: F) -> Result<Arc<Compiled>, Arc<PluginError>>
    where
        F: Future<Output = Result<Vec<u8>, PluginError>>,
    {
        self.compiled
            .try_get_with(sha256.to_owned(), async {
                self.compile_in_turn(&self.loading, read.await?).await
            })
            .await
    }

    /// A component compiled earlier in this process.
    pub async fn cached(&self, sha256: &str) -> Option<Arc<Compiled>> {
        self.compiled.get(sha256).await
    }

    /// Drops a compiled component from this process's cache (a revoked version's: the next
    /// installation to run the same bytes, if any, compiles them again).
    pub async fn forget(&self, sha256: &str) {
        self.compiled.invalidate(sha256).await;
    }

    /// Runs one invocation in a fresh instance under every limit, on the plugin threads. The tenant
    /// and the installation must each have an instance to spare (`instances`, the tenant's plan; an
    /// installation may use three quarters of it, so one stuck installation leaves the others room),
    /// and a tenant that does not pay must find its share open: the tenants without a paid plan
    /// together run at most three quarters of the pool. Signups are free, so a crowd of free accounts
    /// could otherwise hold every instance (each within its own limit) until the deadline, again and
    /// again; this way it leaves a quarter to paying tenants.
    ///
    /// # Errors
    /// See [`InvokeError`]: each limit breach, trap or plugin error has its own variant.
    pub async fn invoke(
        &self,
        compiled: Arc<Compiled>,
        call: Arc<CallContext>,
        services: Arc<dyn Services>,
        request: String,
    ) -> Result<Outcome, InvokeError> {
        let limits = self.limits;
        if request.len() > limits.input_bytes {
            return Err(InvokeError::LimitExceeded(format!(
                "the request is {} bytes; plugins accept at most {} KiB",
                request.len(),
                limits.input_bytes >> 10
            )));
        }
        let tenant_limit = call.instances.max(1);
        let mut claims = vec![
            (format!("tenant:{}", call.tenant_id), tenant_limit, "this tenant"),
            (
                format!("installation:{}", call.installation_id),
                (tenant_limit * 3 / 4).max(1),
                "this installation",
            ),
        ];
        if !call.paying {
            claims.push((
                UNPAID.to_owned(),
                unpaid_share(&limits),
                "the tenants without a paid plan together",
            ));
        }
        let seat = self.occupancy.take(&claims).map_err(|refused| {
            let reason = if refused.key == UNPAID {
                "unpaid_instances"
            } else {
                "tenant_instances"
            };
            metrics::counter!("plinth_plugin_refused_total", "reason" => reason).increment(1);
            InvokeError::Busy(format!("{refused}; retry when one of them has finished"))
        })?;
        let engine = self.engine.clone();
        let (pool, turns) = if call.paying {
            (&self.paying_pool, &self.paying_turns)
        } else {
            (&self.pool, &self.turns)
        };
        let guest = turns.guest(call.tenant_id.to_string());
        let running = pool.spawn(run(
            engine,
            compiled,
            (call, guest),
            services,
            request,
            limits,
            seat,
        ));
        let _abort = AbortOnDrop(running.abort_handle());
        running.await.map_err(|err| {
            InvokeError::Unavailable(format!("the plugin host stopped the invocation: {err}"))
        })?
    }
}

/// The threads the guest code of tenants without a paid plan runs on, together: three quarters of
/// the plugin threads (at least one), as they hold three quarters of the instances.
fn unpaid_threads(limits: &Limits) -> usize {
    (limits.threads.max(1) * 3 / 4).max(1)
}

/// The occupancy key of the tenants without a paid plan, together.
const UNPAID: &str = "unpaid";

/// The instances the tenants without a paid plan may run at once, together: three quarters of the
/// pool.
fn unpaid_share(limits: &Limits) -> u32 {
    (limits.concurrent_instances.max(1) * 3 / 4).max(1)
}

/// Compiles `bytes` and checks the component against the world.
fn check(engine: &Engine, linker: &Linker<Invocation>, bytes: &[u8]) -> Result<Compiled, PluginError> {
    let component = Component::new(engine, bytes)
        .map_err(|err| PluginError::Invalid(format!("not a valid WebAssembly component: {err:#}")))?;
    let mut capabilities = Vec::new();
    for (name, _) in component.component_type().imports(engine) {
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
    let instance = linker.instantiate_pre(&component).map_err(|err| {
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
    Ok(Compiled {
        pre,
        capabilities,
        size: bytes.len(),
    })
}

/// Core instances, memories and tables one instance slot holds, and so the most one component may
/// have (a Python component, the largest kind built here, instantiates 14 core modules and defines
/// one memory and two tables; Rust and JavaScript ones 4).
const CORE_INSTANCES_PER_SLOT: u32 = 32;
const MEMORIES_PER_SLOT: u32 = 4;
const TABLES_PER_SLOT: u32 = 8;

/// The most random bytes one WASI call may ask for.
const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// The longest error message a plugin's own error keeps (it reaches the caller, the publishing
/// checks and the portal).
const MAX_ERROR_BYTES: usize = 4 << 10;

/// What the guest may hand the host in one call (or its handler's answer): the largest request or
/// answer it may make, twice over for a list's per-item overhead, and a MiB more. The host copies
/// what the guest passes before it can check it; beyond this the call traps instead.
fn hostcall_bytes(limits: &Limits) -> usize {
    limits
        .input_bytes
        .max(limits.output_bytes)
        .saturating_mul(2)
        .saturating_add(1 << 20)
}

/// `message` cut to [`MAX_ERROR_BYTES`] at a character boundary.
fn cut(mut message: String) -> String {
    if message.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("… (cut)");
    }
    message
}

/// One invocation, from instantiation to answer, under one wall-clock deadline.
async fn run(
    engine: Engine,
    compiled: Arc<Compiled>,
    (call, turn): (Arc<CallContext>, Guest),
    services: Arc<dyn Services>,
    request: String,
    limits: Limits,
    _seat: Seat,
) -> Result<Outcome, InvokeError> {
    let started = Instant::now();
    let stderr = MemoryOutputPipe::new(STDERR_BYTES);
    let wasi = WasiCtxBuilder::new()
        .stderr(stderr.clone())
        .max_random_size(MAX_RANDOM_BYTES)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build();
    let mut store = Store::new(
        &engine,
        Invocation {
            wasi,
            table: ResourceTable::new(),
            call,
            services,
            limits,
            inference_calls: 0,
            kv_calls: 0,
            logs: Vec::new(),
            log_bytes: 0,
            breach: None,
            memory: MemoryCap {
                memory_bytes: limits.memory_bytes,
                in_use: 0,
                table_elements: 100_000,
                refused: None,
            },
            turn,
        },
    );
    store.limiter(|state| &mut state.memory);
    store.set_hostcall_fuel(hostcall_bytes(&limits));
    store
        .set_fuel(limits.fuel)
        .map_err(|err| InvokeError::Unavailable(err.to_string()))?;
    // Guest code computes only with a turn on the plugin threads (see `Turns`): its host calls are
    // marked, so that a turn held while the invocation is blocked in one can go to another guest,
    // and at every tick the turn is passed on when another guest waits. Busy guest code also yields
    // to the other tasks on its threads every tick, and is interrupted at the deadline; the timeout
    // below stops a guest that waits in the host (a sleep, a model call) or for a turn.
    let turn = store.data().turn.turn();
    store.call_hook(move |_, hook| {
        match hook {
            CallHook::CallingHost => turn.calling_host(),
            CallHook::ReturningFromHost => turn.returning_from_host(),
            CallHook::CallingWasm | CallHook::ReturningFromWasm => {}
        }
        Ok(())
    });
    let deadline = started + limits.deadline;
    let turn = store.data().turn.turn();
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(match turn.at_tick() {
            Some(turn) => UpdateDeadline::YieldCustom(1, turn),
            None => UpdateDeadline::Yield(1),
        })
    });

    let with_turns = store.data().turn.turn().run(async {
        // Its first tick counts from its turn, not from before it waited for one.
        store.set_epoch_deadline(1);
        let plugin = compiled.pre.instantiate_async(&mut store).await?;
        plugin
            .plinth_plugin_handler()
            .call_handle(&mut store, &request)
            .await
    });
    let outcome = tokio::time::timeout_at(deadline.into(), with_turns).await;
    let compute_units = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
    let duration = started.elapsed();
    let state = store.into_data();
    metrics::histogram!("plinth_plugin_invocation_seconds").record(duration.as_secs_f64());
    state.services.finished(
        &state.call,
        crate::Trace {
            logs: state.logs.clone(),
            duration,
            compute_units,
        },
    );
    let timed_out = || {
        InvokeError::Timeout(format!(
            "the plugin ran past its {} ms deadline and was stopped",
            limits.deadline.as_millis()
        ))
    };
    let Ok(outcome) = outcome else {
        return Err(timed_out());
    };
    match outcome {
        Ok(Ok(response)) if response.len() > limits.output_bytes => Err(InvokeError::LimitExceeded(format!(
            "the plugin answered {} bytes; the limit is {} KiB",
            response.len(),
            limits.output_bytes >> 10
        ))),
        Ok(Ok(response)) => Ok(Outcome {
            response,
            compute_units,
            logs: state.logs,
            duration,
        }),
        Ok(Err(v0_1_0::exports::plinth::plugin::handler::Error::InvalidRequest(message))) => {
            Err(InvokeError::Rejected(cut(message)))
        }
        Ok(Err(v0_1_0::exports::plinth::plugin::handler::Error::Failed(message))) => {
            Err(InvokeError::Failed(cut(message)))
        }
        Err(err) => Err(explain_trap(&err, &state, &stderr, limits)),
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
        Some(Trap::StackOverflow) => InvokeError::Trapped("the plugin overflowed its stack".to_owned()),
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
                InvokeError::Trapped(format!("the plugin trapped: {trap}"))
            } else {
                InvokeError::Trapped(format!("the plugin trapped: {trap}: {said}"))
            }
        }
        // wasmtime's words for a call past `hostcall_bytes` (its error type is not public).
        None if format!("{err:#}").contains("fuel allocated for hostcalls has been exhausted") => {
            InvokeError::LimitExceeded(format!(
                "the plugin handed the host more than {} KiB at once (in a call or its answer)",
                hostcall_bytes(&limits) >> 10
            ))
        }
        None if err.to_string().contains("instance") && err.to_string().contains("limit") => {
            InvokeError::Unavailable("every plugin instance slot is busy; retry shortly".to_owned())
        }
        None => InvokeError::Trapped(format!("the plugin could not run: {err:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_limit_holds_for_all_of_an_instances_memories_together() {
        let mut cap = MemoryCap {
            memory_bytes: 64 << 20,
            in_use: 0,
            table_elements: 100,
            refused: None,
        };
        // Two memories created at 16 MiB, one grown to 40 MiB: 56 MiB in all.
        assert!(cap.memory_growing(0, 16 << 20, None).unwrap());
        assert!(cap.memory_growing(0, 16 << 20, None).unwrap());
        assert!(cap.memory_growing(16 << 20, 40 << 20, None).unwrap());
        // A third of 16 MiB would make 72: refused, though it is far below the limit on its own.
        assert!(!cap.memory_growing(0, 16 << 20, None).unwrap());
        assert!(
            cap.refused.as_deref().unwrap_or_default().contains("72 MiB"),
            "{:?}",
            cap.refused
        );
        // The rest still fits.
        assert!(cap.memory_growing(0, 8 << 20, None).unwrap());
    }

    /// Authors publishing (their compilations holding every publishing turn) do not hold up a
    /// component that must be compiled to be invoked.
    #[tokio::test]
    async fn publishing_and_invoked_components_compile_in_turns_of_their_own() {
        let host = PluginHost::new(&HostSettings {
            limits: Limits {
                compile_timeout: Duration::from_millis(500),
                ..Limits::default()
            },
            cache_dir: None,
        })
        .unwrap();
        let _publishing = host.publishing.clone().acquire_owned().await.unwrap();
        let not_a_component = || b"\0asm not a component".to_vec();
        let loaded = host
            .load("0123", async { Ok(not_a_component()) })
            .await
            .unwrap_err();
        assert!(matches!(*loaded, PluginError::Invalid(_)), "{loaded:?}");
        let published = host.compile(not_a_component()).await.unwrap_err();
        assert!(matches!(published, PluginError::Busy(_)), "{published:?}");
    }

    #[test]
    fn a_plugins_error_is_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = cut(long);
        assert!(cut.len() <= MAX_ERROR_BYTES + "… (cut)".len());
        assert!(cut.ends_with("… (cut)"));
        assert_eq!(super::cut("short".to_owned()), "short");
    }
}
