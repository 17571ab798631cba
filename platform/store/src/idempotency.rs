//! Idempotent requests, as Stripe defines them: a client's `Idempotency-Key` names one request (method,
//! path and body, fingerprinted) for the retention window. The first attempt claims the key and runs;
//! its successful answer is stored; every later attempt with the same request gets that answer back
//! without running anything, an attempt with a different request is refused, and an attempt while the
//! first is still running is told to retry.
//!
//! A claim is a lease the running attempt renews. When its worker dies (or its attempt fails), the lease
//! lapses and a retry of the same request takes over under the same [`Claim::ledger_key`], so the
//! ledger still bills the request once. Leases are measured on the database's clock, which every
//! replica shares, so a replica whose own clock is off cannot take a lease early.
//!
//! These rows are written through the store's relaxed-durability connections: a claim is always
//! followed by a durable ledger write on the same database, which makes the claim durable with it, and
//! a lost completion only means a retry re-runs the request under the same ledger key.

use std::time::Duration;

use plinth_core::id::TenantId;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QuerySelect, TransactionTrait,
};

use crate::entity::{TenantScoped, idempotent_requests};
use crate::{Result, Store, StoreError};

const IN_FLIGHT: &str = "in_flight";
const COMPLETED: &str = "completed";
/// Ran and answered, but the answer was too large to keep: the key is spent.
const UNKEPT: &str = "unkept";

/// How keyed requests are held and kept.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencySettings {
    /// How long a claim holds without renewal; a retry after a crash waits at most this long.
    pub lease: Duration,
    /// How long a key names its request (and its answer is replayed).
    pub retention: Duration,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(5),
            retention: Duration::from_secs(24 * 3_600),
        }
    }
}

/// A stored answer, replayed to every retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// The headers that are part of the answer (content type, billing headers).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The right to run a keyed request, held by one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    tenant: TenantId,
    key: String,
    id: String,
    owner: String,
    inherited: bool,
}

impl Claim {
    /// The ledger's name for this request: the same for every attempt at it within the window, and
    /// unlike any key a client can send.
    #[must_use]
    pub fn ledger_key(&self) -> String {
        format!("req:{}", self.id)
    }

    /// This attempt's own name, unique to it: what the request's sub-calls are keyed under.
    #[must_use]
    pub fn attempt_key(&self) -> String {
        format!("req:{}:{}", self.id, self.owner)
    }

    /// Whether this attempt took the request over from one that stopped without an answer (its worker
    /// died, or it failed). The ledger event under [`Self::ledger_key`] may then be the earlier
    /// attempt's, for a call nobody was answered: if this attempt fails too, it withdraws it.
    #[must_use]
    pub fn inherited(&self) -> bool {
        self.inherited
    }
}

/// What an attempt at a keyed request may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Run the request; then [`Store::complete_request`] or [`Store::release_request`].
    Run(Claim),
    /// The request already ran: answer with this.
    Replay(StoredResponse),
    /// Another attempt at the request is running.
    InFlight,
    /// The key names a different request.
    Mismatch,
    /// The request ran and was answered, but its answer was too large to keep: it cannot be replayed,
    /// and running it again under this key would be free work.
    NotKept,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn new_token() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

/// A request's row as an attempt sees it: the answer only when it is one to replay, and the
/// database's clock.
#[derive(Debug, FromQueryResult)]
struct Head {
    key: String,
    id: String,
    fingerprint: String,
    state: String,
    owner: String,
    locked_until_us: i64,
    expires_at_us: i64,
    now_us: i64,
    response_status: Option<i32>,
    response_headers: Option<String>,
    response_body: Option<Vec<u8>>,
}

fn stored(row: Head) -> Result<StoredResponse> {
    let corrupt = || StoreError::Internal("a completed idempotent request has no stored response".into());
    let status = row
        .response_status
        .and_then(|s| u16::try_from(s).ok())
        .ok_or_else(corrupt)?;
    let headers: Vec<(String, String)> = match &row.response_headers {
        Some(json) => serde_json::from_str(json).map_err(|err| StoreError::Internal(err.to_string()))?,
        None => Vec::new(),
    };
    Ok(StoredResponse {
        status,
        headers,
        body: row.response_body.unwrap_or_default(),
    })
}

/// An update of the request `claim` holds, while it holds it.
fn held(claim: &Claim) -> sea_orm::UpdateMany<idempotent_requests::Entity> {
    idempotent_requests::Entity::update_many()
        .filter(idempotent_requests::Column::TenantId.eq(claim.tenant.as_str()))
        .filter(idempotent_requests::Column::Key.eq(claim.key.as_str()))
        .filter(idempotent_requests::Column::Owner.eq(claim.owner.as_str()))
        .filter(idempotent_requests::Column::State.eq(IN_FLIGHT))
}

/// The update that records `claim`'s request as answered: with the answer to replay, or (`None`) as
/// answered without one kept.
fn completion(
    claim: &Claim,
    response: Option<&StoredResponse>,
) -> Result<sea_orm::UpdateMany<idempotent_requests::Entity>> {
    Ok(match response {
        Some(response) => held(claim)
            .col_expr(idempotent_requests::Column::State, Expr::value(COMPLETED))
            .col_expr(
                idempotent_requests::Column::ResponseStatus,
                Expr::value(i32::from(response.status)),
            )
            .col_expr(
                idempotent_requests::Column::ResponseHeaders,
                Expr::value(
                    serde_json::to_string(&response.headers)
                        .map_err(|err| StoreError::Internal(err.to_string()))?,
                ),
            )
            .col_expr(
                idempotent_requests::Column::ResponseBody,
                Expr::value(response.body.clone()),
            ),
        None => held(claim).col_expr(idempotent_requests::Column::State, Expr::value(UNKEPT)),
    })
}

/// Stores answers off the request path: the request is answered as soon as its answer is queued, and
/// one writer stores everything queued meanwhile in a single transaction. An answer still queued when
/// the process dies is lost like a crashed attempt's: its lease lapses and a retry runs the request
/// again under the same ledger key (billed once).
#[derive(Debug, Clone)]
pub struct Completions {
    queue: tokio::sync::mpsc::Sender<Completion>,
}

/// An answer to store, and who waits for it to be stored.
type Completion = (Claim, Option<StoredResponse>, tokio::sync::oneshot::Sender<bool>);

/// Answers one write stores at most.
const COMPLETIONS_PER_WRITE: usize = 256;

impl Completions {
    /// Starts the writer; it drains and stops when every handle is dropped.
    #[must_use]
    pub fn start(store: Store) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, mut receiver) = tokio::sync::mpsc::channel::<Completion>(4_096);
        let writer = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(COMPLETIONS_PER_WRITE);
            while receiver.recv_many(&mut batch, COMPLETIONS_PER_WRITE).await > 0 {
                let (answers, waiting): (Vec<_>, Vec<_>) = batch
                    .drain(..)
                    .map(|(claim, response, stored)| ((claim, response), stored))
                    .unzip();
                let stored = match store.complete_many(&answers).await {
                    Ok(stored) => stored,
                    Err(err) => {
                        tracing::error!(error = %err, answers = answers.len(), "cannot store idempotent answers");
                        vec![false; answers.len()]
                    }
                };
                let lost = stored.iter().filter(|stored| !**stored).count();
                if lost > 0 {
                    // Each a request whose retry will run it again: loud, not silent.
                    metrics::counter!("plinth_idempotent_answers_lost_total").increment(lost as u64);
                    tracing::error!(
                        answers = lost,
                        "idempotent answers not stored: their leases were lost"
                    );
                }
                for (wait, stored) in waiting.into_iter().zip(stored) {
                    let _ = wait.send(stored);
                }
            }
        });
        (Self { queue }, writer)
    }

    /// Queues an answer (waiting only while the queue is full); the receiver says, once it was
    /// written, whether it was stored (`false`: the claim's lease had gone to another attempt, or
    /// the write failed). Keep the claim's lease until then.
    pub async fn complete(
        &self,
        claim: Claim,
        response: Option<StoredResponse>,
    ) -> tokio::sync::oneshot::Receiver<bool> {
        let (stored, written) = tokio::sync::oneshot::channel();
        if self.queue.send((claim, response, stored)).await.is_err() {
            tracing::error!("the idempotent answers writer stopped; an answer is not stored");
        }
        written
    }
}

/// A claim about to be inserted.
#[derive(Debug, Clone)]
struct NewClaim {
    tenant: TenantId,
    key: String,
    fingerprint: String,
    settings: IdempotencySettings,
    id: String,
    owner: String,
}

impl NewClaim {
    fn new(tenant: &TenantId, key: &str, fingerprint: &str, settings: IdempotencySettings) -> Self {
        Self {
            tenant: tenant.clone(),
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            settings,
            id: new_token(),
            owner: new_token(),
        }
    }

    fn into_claim(self) -> Claim {
        Claim {
            tenant: self.tenant,
            key: self.key,
            id: self.id,
            owner: self.owner,
            inherited: false,
        }
    }
}

/// Claims keyed requests the way the ledger records usage: one writer inserts every claim queued
/// while its previous insert ran, in one statement, so concurrent keyed calls share a write instead
/// of queueing for one each (SQLite has one writer; on Postgres each statement costs a round trip).
#[derive(Debug, Clone)]
pub struct Claims {
    queue: tokio::sync::mpsc::Sender<(NewClaim, tokio::sync::oneshot::Sender<Result<bool>>)>,
}

/// Claims one insert carries at most (9 parameters each).
const CLAIMS_PER_INSERT: usize = 256;

impl Claims {
    /// Starts the writer; it drains and stops when every handle is dropped.
    #[must_use]
    pub fn start(store: Store) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, mut receiver) =
            tokio::sync::mpsc::channel::<(NewClaim, tokio::sync::oneshot::Sender<Result<bool>>)>(4_096);
        let writer = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(CLAIMS_PER_INSERT);
            while receiver.recv_many(&mut batch, CLAIMS_PER_INSERT).await > 0 {
                let claims: Vec<NewClaim> = batch.iter().map(|(claim, _)| claim.clone()).collect();
                match store.insert_claims(&claims, Clock::Database).await {
                    Ok(inserted) => {
                        for ((_, reply), inserted) in batch.drain(..).zip(inserted) {
                            let _ = reply.send(Ok(inserted));
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, claims = batch.len(), "cannot insert idempotency claims");
                        for (_, reply) in batch.drain(..) {
                            let _ = reply.send(Err(StoreError::Unavailable(
                                "idempotency claims could not be written".into(),
                            )));
                        }
                    }
                }
            }
        });
        (Self { queue }, writer)
    }

    /// [`Store::attempt_request`], with the claim's insert shared with concurrent ones.
    pub async fn attempt(
        &self,
        store: &Store,
        tenant: &TenantId,
        key: &str,
        fingerprint: &str,
        settings: IdempotencySettings,
    ) -> Result<Attempt> {
        let new = NewClaim::new(tenant, key, fingerprint, settings);
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue
            .send((new.clone(), reply))
            .await
            .map_err(|_| StoreError::Unavailable("the idempotency claims writer stopped".into()))?;
        let inserted = answer
            .await
            .map_err(|_| StoreError::Unavailable("the idempotency claims writer stopped".into()))??;
        if inserted {
            return Ok(Attempt::Run(new.into_claim()));
        }
        store
            .taken(tenant, key, fingerprint, settings, Clock::Database)
            .await
    }
}

/// Whose clock a lease is measured on: the database's, or (in tests) a given time.
#[derive(Debug, Clone, Copy)]
enum Clock {
    Database,
    #[cfg(test)]
    At(i64),
}

impl Store {
    fn now(&self, clock: Clock) -> Expr {
        match clock {
            Clock::Database => Expr::cust(self.clock_sql()),
            #[cfg(test)]
            Clock::At(us) => Expr::val(us),
        }
    }

    /// Claims `key` for the request `fingerprint` describes, or says why this attempt may not run.
    /// One round trip when the key is new (the usual case), two otherwise.
    pub async fn attempt_request(
        &self,
        tenant: &TenantId,
        key: &str,
        fingerprint: &str,
        settings: IdempotencySettings,
    ) -> Result<Attempt> {
        self.attempt(tenant, key, fingerprint, settings, Clock::Database)
            .await
    }

    /// [`Self::attempt_request`] at a given time on the database's clock.
    #[cfg(test)]
    pub(crate) async fn attempt_request_at(
        &self,
        tenant: &TenantId,
        key: &str,
        fingerprint: &str,
        settings: IdempotencySettings,
        now_us: i64,
    ) -> Result<Attempt> {
        self.attempt(tenant, key, fingerprint, settings, Clock::At(now_us))
            .await
    }

    async fn attempt(
        &self,
        tenant: &TenantId,
        key: &str,
        fingerprint: &str,
        settings: IdempotencySettings,
        clock: Clock,
    ) -> Result<Attempt> {
        let new = NewClaim::new(tenant, key, fingerprint, settings);
        if self.insert_claims(std::slice::from_ref(&new), clock).await?[0] {
            return Ok(Attempt::Run(new.into_claim()));
        }
        self.taken(tenant, key, fingerprint, settings, clock).await
    }

    /// Inserts new claims, one statement for all of them; says, for each, whether it was inserted
    /// (otherwise its key was taken, by an earlier request or by one before it in `claims`).
    async fn insert_claims(&self, claims: &[NewClaim], clock: Clock) -> Result<Vec<bool>> {
        use idempotent_requests::Column as C;
        let now = self.now(clock);
        let mut insert = Query::insert();
        insert.into_table(idempotent_requests::Entity).columns([
            C::TenantId,
            C::Key,
            C::Id,
            C::Fingerprint,
            C::State,
            C::Owner,
            C::LockedUntilUs,
            C::CreatedAtUs,
            C::ExpiresAtUs,
        ]);
        for claim in claims {
            insert
                .values([
                    Expr::val(claim.tenant.as_str()),
                    Expr::val(claim.key.as_str()),
                    Expr::val(claim.id.as_str()),
                    Expr::val(claim.fingerprint.as_str()),
                    Expr::val(IN_FLIGHT),
                    Expr::val(claim.owner.as_str()),
                    now.clone().add(micros(claim.settings.lease)),
                    now.clone(),
                    now.clone().add(micros(claim.settings.retention)),
                ])
                .map_err(|err| StoreError::Internal(err.to_string()))?;
        }
        insert
            .on_conflict(OnConflict::columns([C::TenantId, C::Key]).do_nothing().to_owned())
            .returning(Query::returning().column(C::Owner));
        let turn = self.write_turn().await;
        let rows = self.relaxed().query_all(&insert).await?;
        drop(turn);
        let inserted = rows
            .iter()
            .map(|row| row.try_get::<String>("", "owner"))
            .collect::<std::result::Result<std::collections::HashSet<String>, _>>()?;
        Ok(claims.iter().map(|c| inserted.contains(&c.owner)).collect())
    }

    /// What an attempt may do when its key was taken.
    async fn taken(
        &self,
        tenant: &TenantId,
        key: &str,
        fingerprint: &str,
        settings: IdempotencySettings,
        clock: Clock,
    ) -> Result<Attempt> {
        use idempotent_requests::Column as C;
        // A read: on the main connections, which read in parallel (the relaxed ones are for writes).
        let db = self.db();
        let now = self.now(clock);
        // The key is taken. Its answer is read only when it is this request's to replay: refusals
        // and waits never load a stored body.
        let replayable = Expr::col(C::State)
            .eq(COMPLETED)
            .and(Expr::col(C::Fingerprint).eq(fingerprint));
        let answer = |column: C, none: sea_orm::Value| -> Expr {
            Expr::case(replayable.clone(), Expr::col(column))
                .finally(Expr::value(none))
                .into()
        };
        let row = idempotent_requests::Entity::find_in(tenant)
            .filter(C::Key.eq(key))
            .select_only()
            .columns([
                C::Key,
                C::Id,
                C::Fingerprint,
                C::State,
                C::Owner,
                C::LockedUntilUs,
                C::ExpiresAtUs,
            ])
            .column_as(now, "now_us")
            .column_as(answer(C::ResponseStatus, None::<i32>.into()), "response_status")
            .column_as(
                answer(C::ResponseHeaders, None::<String>.into()),
                "response_headers",
            )
            .column_as(answer(C::ResponseBody, None::<Vec<u8>>.into()), "response_body")
            .into_model::<Head>()
            .one(db)
            .await?
            .ok_or_else(|| StoreError::Internal("an idempotent request vanished".into()))?;
        let now_us = row.now_us;
        if row.expires_at_us <= now_us {
            // The window has passed (the purge has not run yet): the key names nothing any more, and
            // this is a new request with a new ledger name.
            let retaken = self
                .retake(tenant, &row, fingerprint, Some(new_token()), settings)
                .await?;
            return Ok(retaken.map_or(Attempt::InFlight, Attempt::Run));
        }
        if row.fingerprint != fingerprint {
            return Ok(Attempt::Mismatch);
        }
        if row.state == UNKEPT {
            return Ok(Attempt::NotKept);
        }
        if row.state == COMPLETED {
            return Ok(Attempt::Replay(stored(row)?));
        }
        if row.locked_until_us > now_us {
            return Ok(Attempt::InFlight);
        }
        // The holder died or gave up: this attempt takes over the same request.
        let retaken = self.retake(tenant, &row, fingerprint, None, settings).await?;
        Ok(retaken.map_or(Attempt::InFlight, Attempt::Run))
    }

    /// Takes `row` over for a new attempt, if nobody else did first. With `new_id`, it becomes a new
    /// request (its window had passed).
    async fn retake(
        &self,
        tenant: &TenantId,
        row: &Head,
        fingerprint: &str,
        new_id: Option<String>,
        settings: IdempotencySettings,
    ) -> Result<Option<Claim>> {
        let now_us = row.now_us;
        let owner = new_token();
        let mut update = idempotent_requests::Entity::update_many()
            .col_expr(idempotent_requests::Column::Owner, Expr::value(owner.clone()))
            .col_expr(
                idempotent_requests::Column::LockedUntilUs,
                Expr::value(now_us.saturating_add(micros(settings.lease))),
            );
        if let Some(id) = &new_id {
            update = update
                .col_expr(idempotent_requests::Column::Id, Expr::value(id.clone()))
                .col_expr(idempotent_requests::Column::Fingerprint, Expr::value(fingerprint))
                .col_expr(idempotent_requests::Column::State, Expr::value(IN_FLIGHT))
                .col_expr(
                    idempotent_requests::Column::ResponseStatus,
                    Expr::value(Option::<i32>::None),
                )
                .col_expr(
                    idempotent_requests::Column::ResponseHeaders,
                    Expr::value(Option::<String>::None),
                )
                .col_expr(
                    idempotent_requests::Column::ResponseBody,
                    Expr::value(Option::<Vec<u8>>::None),
                )
                .col_expr(idempotent_requests::Column::CreatedAtUs, Expr::value(now_us))
                .col_expr(
                    idempotent_requests::Column::ExpiresAtUs,
                    Expr::value(now_us.saturating_add(micros(settings.retention))),
                );
        }
        // Compare-and-set on the holder: of two attempts retaking at once, one wins.
        let _turn = self.write_turn().await;
        let result = update
            .filter(idempotent_requests::Column::TenantId.eq(tenant.as_str()))
            .filter(idempotent_requests::Column::Key.eq(row.key.as_str()))
            .filter(idempotent_requests::Column::Owner.eq(row.owner.as_str()))
            .exec(self.relaxed())
            .await?;
        if result.rows_affected != 1 {
            return Ok(None);
        }
        Ok(Some(Claim {
            tenant: tenant.clone(),
            key: row.key.clone(),
            inherited: new_id.is_none(),
            id: new_id.unwrap_or_else(|| row.id.clone()),
            owner,
        }))
    }

    /// Extends the claim's lease while its request runs. `false`: another attempt took it over.
    pub async fn renew_request(&self, claim: &Claim, lease: Duration) -> Result<bool> {
        self.renew(claim, lease, Clock::Database).await
    }

    #[cfg(test)]
    pub(crate) async fn renew_request_at(&self, claim: &Claim, lease: Duration, now_us: i64) -> Result<bool> {
        self.renew(claim, lease, Clock::At(now_us)).await
    }

    async fn renew(&self, claim: &Claim, lease: Duration, clock: Clock) -> Result<bool> {
        let _turn = self.write_turn().await;
        let result = held(claim)
            .col_expr(
                idempotent_requests::Column::LockedUntilUs,
                self.now(clock).add(micros(lease)),
            )
            .exec(self.relaxed())
            .await?;
        Ok(result.rows_affected == 1)
    }

    /// Stores the request's answer; every retry within the window gets it back. `None`: the request
    /// was answered but the answer is not kept (too large); the key is spent. Tried once more on the
    /// durable connections if the relaxed ones fail: a request left in flight would run again, free,
    /// once its lease lapsed.
    /// Returns whether it was stored: not when the claim's lease had gone to another attempt.
    pub async fn complete_request(&self, claim: &Claim, response: Option<&StoredResponse>) -> Result<bool> {
        let _turn = self.write_turn().await;
        let result = match completion(claim, response)?.exec(self.relaxed()).await {
            Ok(result) => result,
            Err(err) => {
                tracing::warn!(error = %err, "cannot store an answer on the relaxed connections; trying the others");
                completion(claim, response)?.exec(self.db()).await?
            }
        };
        Ok(result.rows_affected == 1)
    }

    /// Stores many answers in one write (see [`Completions`]); on failure, each on its own. Returns,
    /// for each, whether it was stored.
    async fn complete_many(&self, batch: &[(Claim, Option<StoredResponse>)]) -> Result<Vec<bool>> {
        let written = async {
            let _turn = self.write_turn().await;
            let txn = self
                .relaxed()
                .begin_with_options(sea_orm::TransactionOptions {
                    sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                    ..sea_orm::TransactionOptions::default()
                })
                .await?;
            let mut stored = Vec::with_capacity(batch.len());
            for (claim, answer) in batch {
                let result = completion(claim, answer.as_ref())?.exec(&txn).await?;
                stored.push(result.rows_affected == 1);
            }
            txn.commit().await?;
            Ok::<_, StoreError>(stored)
        }
        .await;
        match written {
            Ok(stored) => Ok(stored),
            Err(err) => {
                tracing::warn!(error = %err, answers = batch.len(), "cannot store answers together; storing them one by one");
                let mut stored = Vec::with_capacity(batch.len());
                for (claim, answer) in batch {
                    stored.push(self.complete_request(claim, answer.as_ref()).await?);
                }
                Ok(stored)
            }
        }
    }

    /// Gives the claim up without an answer (the request failed): a retry of the same request may run
    /// at once, under the same ledger name. The key still names this request. The holder token
    /// changes too, so a renewal of this attempt still on its way cannot take the lease back.
    pub async fn release_request(&self, claim: &Claim) -> Result<()> {
        let _turn = self.write_turn().await;
        held(claim)
            .col_expr(idempotent_requests::Column::LockedUntilUs, Expr::value(0_i64))
            .col_expr(
                idempotent_requests::Column::Owner,
                Expr::value(format!("released:{}", new_token())),
            )
            .exec(self.relaxed())
            .await?;
        Ok(())
    }

    /// Removes requests whose window has passed, at most `limit` of them (so one purge never holds
    /// SQLite's writer for long); returns how many.
    pub async fn purge_idempotent_requests(&self, limit: u64) -> Result<u64> {
        self.purge(limit, Clock::Database).await
    }

    #[cfg(test)]
    pub(crate) async fn purge_idempotent_requests_at(&self, now_us: i64, limit: u64) -> Result<u64> {
        self.purge(limit, Clock::At(now_us)).await
    }

    async fn purge(&self, limit: u64, clock: Clock) -> Result<u64> {
        let expired: Vec<(String, String)> = idempotent_requests::Entity::find()
            .filter(Expr::col(idempotent_requests::Column::ExpiresAtUs).lte(self.now(clock)))
            .select_only()
            .column(idempotent_requests::Column::TenantId)
            .column(idempotent_requests::Column::Key)
            .limit(limit)
            .into_tuple()
            .all(self.db())
            .await?;
        let mut removed = 0;
        for batch in expired.chunks(500) {
            let mut any = sea_orm::Condition::any();
            for (tenant, key) in batch {
                any = any.add(
                    sea_orm::Condition::all()
                        .add(idempotent_requests::Column::TenantId.eq(tenant.as_str()))
                        .add(idempotent_requests::Column::Key.eq(key.as_str())),
                );
            }
            removed += idempotent_requests::Entity::delete_many()
                .filter(any)
                .filter(Expr::col(idempotent_requests::Column::ExpiresAtUs).lte(self.now(clock)))
                .exec(self.db())
                .await?
                .rows_affected;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tenant_with_customer, test_store};

    const SECOND: i64 = 1_000_000;

    fn settings() -> IdempotencySettings {
        IdempotencySettings {
            lease: Duration::from_secs(5),
            retention: Duration::from_secs(3_600),
        }
    }

    fn answer(body: &str) -> StoredResponse {
        StoredResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn a_key_names_one_request_and_replays_its_answer() {
        let (store, _dir) = test_store().await;
        let tenant = tenant_with_customer(&store, "cus_1").await;
        let now = 1_000 * SECOND;
        let Attempt::Run(claim) = store
            .attempt_request_at(&tenant, "k", "fp-a", settings(), now)
            .await
            .unwrap()
        else {
            panic!("the first attempt runs");
        };
        assert!(claim.ledger_key().starts_with("req:"));
        // While it runs: the same request waits, another request under the key is refused.
        assert_eq!(
            store
                .attempt_request_at(&tenant, "k", "fp-a", settings(), now)
                .await
                .unwrap(),
            Attempt::InFlight
        );
        assert_eq!(
            store
                .attempt_request_at(&tenant, "k", "fp-b", settings(), now)
                .await
                .unwrap(),
            Attempt::Mismatch
        );
        assert!(
            store
                .complete_request(&claim, Some(&answer("{\"n\":1}")))
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .attempt_request_at(&tenant, "k", "fp-a", settings(), now + SECOND)
                .await
                .unwrap(),
            Attempt::Replay(answer("{\"n\":1}"))
        );
        assert_eq!(
            store
                .attempt_request_at(&tenant, "k", "fp-b", settings(), now + SECOND)
                .await
                .unwrap(),
            Attempt::Mismatch
        );
        // Keys are per tenant.
        let other = tenant_with_customer(&store, "cus_2").await;
        assert!(matches!(
            store
                .attempt_request_at(&other, "k", "fp-b", settings(), now)
                .await
                .unwrap(),
            Attempt::Run(_)
        ));
    }

    #[tokio::test]
    async fn the_answers_writer_says_which_answers_it_stored() {
        let (store, _dir) = test_store().await;
        let tenant = tenant_with_customer(&store, "cus_1").await;
        let now = 1_000 * SECOND;
        let run = |key: &'static str, at: i64| {
            let (store, tenant) = (store.clone(), tenant.clone());
            async move {
                match store
                    .attempt_request_at(&tenant, key, "fp", settings(), at)
                    .await
                    .unwrap()
                {
                    Attempt::Run(claim) => claim,
                    other => panic!("{other:?}"),
                }
            }
        };
        let kept = run("kept", now).await;
        // This one's lease lapsed and a retry took it over before its answer was written.
        let lost = run("lost", now).await;
        let retry = run("lost", now + 6 * SECOND).await;
        let (completions, writer) = Completions::start(store.clone());
        let kept = completions.complete(kept, Some(answer("1"))).await;
        let lost = completions.complete(lost, Some(answer("2"))).await;
        assert!(kept.await.unwrap());
        assert!(!lost.await.unwrap());
        // The retry holds the request still, and stores its own answer.
        assert!(
            completions
                .complete(retry, Some(answer("3")))
                .await
                .await
                .unwrap()
        );
        drop(completions);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_dead_or_failed_attempt_is_taken_over_under_the_same_ledger_key() {
        let (store, _dir) = test_store().await;
        let tenant = tenant_with_customer(&store, "cus_1").await;
        let now = 1_000 * SECOND;
        let Attempt::Run(first) = store
            .attempt_request_at(&tenant, "k", "fp", settings(), now)
            .await
            .unwrap()
        else {
            panic!("runs");
        };
        // The worker died: after the lease, a retry takes over, with the same ledger key.
        let later = now + 6 * SECOND;
        let Attempt::Run(second) = store
            .attempt_request_at(&tenant, "k", "fp", settings(), later)
            .await
            .unwrap()
        else {
            panic!("the lease lapsed");
        };
        assert_eq!(second.ledger_key(), first.ledger_key());
        assert!(second.inherited() && !first.inherited());
        assert_ne!(second.attempt_key(), first.attempt_key());
        // The dead attempt, if it comes back, holds nothing.
        assert!(
            !store
                .renew_request_at(&first, settings().lease, later)
                .await
                .unwrap()
        );
        // Its late answer is not stored, and it is told so.
        assert!(
            !store
                .complete_request(&first, Some(&answer("stale")))
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .attempt_request_at(&tenant, "k", "fp", settings(), later)
                .await
                .unwrap(),
            Attempt::InFlight
        );
        // A failure releases at once, and a late renewal of the failed attempt cannot take it back;
        // the retry keeps the ledger key.
        store.release_request(&second).await.unwrap();
        assert!(
            !store
                .renew_request_at(&second, settings().lease, later)
                .await
                .unwrap()
        );
        let Attempt::Run(third) = store
            .attempt_request_at(&tenant, "k", "fp", settings(), later)
            .await
            .unwrap()
        else {
            panic!("released");
        };
        assert_eq!(third.ledger_key(), first.ledger_key());
    }

    #[tokio::test]
    async fn an_answer_too_large_to_keep_spends_the_key() {
        let (store, _dir) = test_store().await;
        let tenant = tenant_with_customer(&store, "cus_1").await;
        let now = 1_000 * SECOND;
        let Attempt::Run(claim) = store
            .attempt_request_at(&tenant, "k", "fp", settings(), now)
            .await
            .unwrap()
        else {
            panic!("runs");
        };
        store.complete_request(&claim, None).await.unwrap();
        for later in [now + SECOND, now + 60 * SECOND] {
            assert_eq!(
                store
                    .attempt_request_at(&tenant, "k", "fp", settings(), later)
                    .await
                    .unwrap(),
                Attempt::NotKept,
                "never run again for free"
            );
        }
    }

    #[tokio::test]
    async fn after_the_window_a_key_is_a_new_request_and_expired_ones_are_purged() {
        let (store, _dir) = test_store().await;
        let tenant = tenant_with_customer(&store, "cus_1").await;
        let now = 1_000 * SECOND;
        let Attempt::Run(first) = store
            .attempt_request_at(&tenant, "k", "fp-a", settings(), now)
            .await
            .unwrap()
        else {
            panic!("runs");
        };
        store.complete_request(&first, Some(&answer("a"))).await.unwrap();
        let after = now + 3_601 * SECOND;
        let Attempt::Run(fresh) = store
            .attempt_request_at(&tenant, "k", "fp-b", settings(), after)
            .await
            .unwrap()
        else {
            panic!("the window has passed");
        };
        assert_ne!(fresh.ledger_key(), first.ledger_key(), "billed as a new call");
        assert_eq!(store.purge_idempotent_requests_at(after, 100).await.unwrap(), 0);
        assert_eq!(
            store
                .purge_idempotent_requests_at(after + 3_601 * SECOND, 100)
                .await
                .unwrap(),
            1
        );
        // The database's clock is the one that counts, and it reads as real time.
        let db_now = store.database_now_us().await.unwrap();
        let local_now = chrono::Utc::now().timestamp_micros();
        assert!((db_now - local_now).abs() < 5 * SECOND, "{db_now} vs {local_now}");
    }
}
