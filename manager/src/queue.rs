//! The durable job queue: jobs, leases, attempts, upload tokens and reports in SQLite.
//!
//! Every operation is one transaction, every state change goes through
//! [`JobState::transition`] and is logged in the `events` table, and every recorded done report
//! is kept in the `reports` table keyed by (job, attempt), so a report is recorded at most once.
//! A lease stays current until [`Queue::expire_leases`] or [`Queue::release_agent`] takes it
//! away; the sweeper is the only judge of expiry.
//!
//! Times are unix milliseconds from the queue's [`Clock`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use copilot_protocol::api::{
    FileView, JobList, JobView, OutcomeView, ReplicaView, Stored, Validation, VerdictView,
    VolunteerCredit, VolunteerList,
};
use copilot_protocol::job::InputSource;
use copilot_protocol::state::BadTransition;
use copilot_protocol::summary::{batch_of, BatchSummary, CauseCount, HostContribution};
use copilot_protocol::wire::{DoneReport, Outcome, Phase, Volunteer};
use copilot_protocol::{JobId, JobSpec, JobState, Sha256};
use rand::RngCore;
use rusqlite::{
    params, Connection, OptionalExtension, Params, Row, Transaction, TransactionBehavior,
};

use crate::fleet::now_ms;

/// The schema version this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 5;

const SCHEMA: &str = "
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL,
    agent TEXT,
    lease_until INTEGER,
    token TEXT UNIQUE,
    token_until INTEGER,
    outcome TEXT,
    archive_attempt INTEGER,
    archive_sha TEXT,
    archive_size INTEGER,
    archive_url TEXT,
    upload_url TEXT,
    files TEXT,
    timings TEXT,
    sandbox TEXT,
    note TEXT,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL
);
CREATE INDEX jobs_by_state ON jobs(state, id);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job INTEGER NOT NULL REFERENCES jobs(id),
    attempt INTEGER NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    at INTEGER NOT NULL,
    why TEXT NOT NULL
);
CREATE INDEX events_by_job ON events(job, id);
CREATE TABLE reports (
    job INTEGER NOT NULL REFERENCES jobs(id),
    attempt INTEGER NOT NULL,
    agent TEXT NOT NULL,
    state TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (job, attempt)
);
";

/// Added in schema version 3: replicated jobs. Every replica of a group names the group's first
/// replica in `replica_of`; `validation` says whether its result counts.
const REPLICA_SCHEMA: &str = "
ALTER TABLE jobs ADD COLUMN replica_of INTEGER REFERENCES jobs(id);
ALTER TABLE jobs ADD COLUMN validation TEXT;
CREATE INDEX jobs_by_replica_group ON jobs(replica_of);
";

/// Added in schema version 4: the BOINC user an attempt's agent computes for, when it said, so
/// that the replicas of a job go to different volunteers.
const VOLUNTEER_SCHEMA: &str = "
ALTER TABLE jobs ADD COLUMN boinc_user INTEGER;
";

/// Added in schema version 5: what a job's validator command said of two of its replicas (`a`
/// < `b`, job ids), and an index of the replicas whose validation is pending.
const AGREEMENT_SCHEMA: &str = "
CREATE TABLE agreements (
    a INTEGER NOT NULL REFERENCES jobs(id),
    b INTEGER NOT NULL REFERENCES jobs(id),
    same INTEGER NOT NULL,
    detail TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (a, b)
);
CREATE INDEX agreements_by_b ON agreements(b);
CREATE INDEX jobs_pending_validation ON jobs(replica_of) WHERE validation = 'pending';
";

/// Added in schema version 2: credit per BOINC user and host.
const CREDIT_SCHEMA: &str = "
CREATE TABLE credit (
    user_id INTEGER NOT NULL,
    host_id INTEGER NOT NULL,
    team_id INTEGER NOT NULL,
    host_token TEXT,
    jobs INTEGER NOT NULL,
    cpu_ms INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    PRIMARY KEY (user_id, host_id)
);
";

/// The SQL list of leased states.
const LEASED: &str = "('assigned', 'running', 'uploading')";

/// Where the queue gets the time (unix ms). Tests pass a clock they control.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("attempt {attempt} of job {job} holds no lease any more (requeued, finished or held by another agent)")]
    StaleLease { job: JobId, attempt: u32 },
    #[error("there is no job {0}")]
    UnknownJob(JobId),
    #[error(transparent)]
    BadTransition(#[from] BadTransition),
    #[error(
        "the upload token is not valid for this job attempt (wrong, expired, or the lease is gone)"
    )]
    TokenInvalid,
    #[error("queue database holds something unreadable: {0}")]
    Corrupt(String),
}

impl QueueError {
    /// SQLite could not write because the disk (or the database's size limit) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            QueueError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull
        )
    }
}

/// Two done replicas of a job with a validator, not compared yet (`a` < `b`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comparison {
    pub group: JobId,
    pub a: JobId,
    pub b: JobId,
    /// The validator the job names.
    pub validator: String,
}

/// A job handed to an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub job: JobId,
    pub attempt: u32,
    pub spec: JobSpec,
    pub upload_token: String,
}

/// What [`Queue::complete`] did with a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The report was recorded; the job is now in this state.
    Recorded(JobState),
    /// The same attempt's report had been recorded before; nothing changed.
    Duplicate,
}

/// The durable job queue. Cheap operations behind one connection; `Send + Sync`.
pub struct Queue {
    conn: Mutex<Connection>,
    /// A read-only connection for the reads for people (dashboard, summaries): in WAL mode it
    /// reads a snapshot without waiting for, or holding up, the connection that dispatches.
    reader: Mutex<Connection>,
    clock: Clock,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

/// The columns of a job row that the lease logic needs.
struct Current {
    id: JobId,
    state: JobState,
    attempt: u32,
    max_retries: u32,
    agent: Option<String>,
    token: Option<String>,
    token_until: Option<u64>,
    archive: Option<Stored>,
    spec: String,
    /// The replica group (its first replica's id), for a replicated job.
    replica_of: Option<JobId>,
}

impl Current {
    fn holds(&self, agent: &str, attempt: u32) -> bool {
        self.state.is_leased() && self.agent.as_deref() == Some(agent) && self.attempt == attempt
    }
}

fn corrupt(what: impl fmt::Display) -> QueueError {
    QueueError::Corrupt(what.to_string())
}

fn parse_state(s: &str) -> Result<JobState, QueueError> {
    s.parse().map_err(corrupt)
}

fn parse_sha(s: &str) -> Result<Sha256, QueueError> {
    s.parse().map_err(corrupt)
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, QueueError> {
    serde_json::from_str(s).map_err(corrupt)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, QueueError> {
    serde_json::to_string(v).map_err(corrupt)
}

/// `now + d` in ms, capped to what SQLite's INTEGER holds.
fn deadline(now: u64, d: Duration) -> u64 {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    now.saturating_add(ms).min(i64::MAX as u64)
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Compares without an early exit, so the time taken does not reveal a token prefix.
pub(crate) fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn outcome_view(o: &Outcome) -> OutcomeView {
    let (kind, exit_code, signal) = match o {
        Outcome::Exited { code } => ("exited", Some(*code), None),
        Outcome::Killed { signal } => ("killed", None, Some(*signal)),
        Outcome::TimedOut => ("timed-out", None, None),
        Outcome::LimitExceeded { .. } => ("limit-exceeded", None, None),
        Outcome::StageInFailed(_) => ("stage-in-failed", None, None),
        Outcome::SetupFailed(_) => ("setup-failed", None, None),
        Outcome::StageOutFailed(_) => ("stage-out-failed", None, None),
        Outcome::Refused(_) => ("refused", None, None),
    };
    OutcomeView {
        kind: kind.into(),
        exit_code,
        signal,
        limit: match o {
            Outcome::LimitExceeded { limit } => Some(limit.as_str().into()),
            _ => None,
        },
        text: o.describe(),
    }
}

/// Statements kept compiled per connection: room for every `*_cached` statement below (17;
/// rusqlite's default of 16 would evict one of them now and then).
const STATEMENT_CACHE: usize = 32;

/// Running SQL through the connection's prepared-statement cache. The queue runs the same few
/// statements for every job; compiling their SQL again on every call cost 15–20 % of its time
/// per job (docs/BENCHMARKS.md).
trait Cached {
    /// [`Connection::execute`], with the statement compiled once per connection.
    fn execute_cached<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;

    /// [`Connection::query_row`], with the statement compiled once per connection.
    fn query_row_cached<T, P: Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn execute_cached<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn query_row_cached<T, P: Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// Whether `id` can name a row at all: SQLite row ids are `i64`, job ids on the wire `u64`.
fn storable(id: JobId) -> bool {
    i64::try_from(id).is_ok()
}

fn load(tx: &Transaction<'_>, id: JobId) -> Result<Option<Current>, QueueError> {
    if !storable(id) {
        return Ok(None);
    }
    type Raw = (
        String,
        u32,
        u32,
        Option<String>,
        Option<String>,
        Option<u64>,
        Option<String>,
        Option<u64>,
        String,
        Option<JobId>,
    );
    let raw: Option<Raw> = tx
        .query_row_cached(
            "SELECT state, attempt, max_retries, agent, token, token_until, archive_sha,
                    archive_size, spec, replica_of FROM jobs WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            },
        )
        .optional()?;
    let Some((state, attempt, max_retries, agent, token, token_until, sha, size, spec, replica_of)) =
        raw
    else {
        return Ok(None);
    };
    let archive = match (sha, size) {
        (Some(sha), Some(size)) => Some(Stored {
            sha256: parse_sha(&sha)?,
            size,
        }),
        _ => None,
    };
    Ok(Some(Current {
        id,
        state: parse_state(&state)?,
        attempt,
        max_retries,
        agent,
        token,
        token_until,
        archive,
        spec,
        replica_of,
    }))
}

/// Move job `id` from `from` to `to` (checked) and log the event.
fn set_state(
    tx: &Transaction<'_>,
    id: JobId,
    attempt: u32,
    from: JobState,
    to: JobState,
    why: &str,
    now: u64,
) -> Result<JobState, QueueError> {
    let to = from.transition(to)?;
    tx.execute_cached(
        "UPDATE jobs SET state = ?1, updated = ?2 WHERE id = ?3",
        params![to.as_str(), now, id],
    )?;
    tx.execute_cached(
        "INSERT INTO events (job, attempt, from_state, to_state, at, why)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, attempt, from.as_str(), to.as_str(), now, why],
    )?;
    tracing::debug!(job = id, attempt, %from, %to, why, "job state");
    Ok(to)
}

/// The leased job lost its attempt: lost → queued (retries left) or failed. Drops the lease.
fn lose(tx: &Transaction<'_>, cur: &Current, why: &str, now: u64) -> Result<JobState, QueueError> {
    set_state(tx, cur.id, cur.attempt, cur.state, JobState::Lost, why, now)?;
    let (next, note) = if cur.attempt <= cur.max_retries {
        (
            JobState::Queued,
            format!("attempt {} lost ({why}); requeued", cur.attempt),
        )
    } else {
        (
            JobState::Failed,
            format!(
                "attempt {} lost ({why}); no retries left of {}",
                cur.attempt, cur.max_retries
            ),
        )
    };
    let state = set_state(tx, cur.id, cur.attempt, JobState::Lost, next, &note, now)?;
    tx.execute_cached(
        "UPDATE jobs SET lease_until = NULL, token = NULL, token_until = NULL, note = ?1
         WHERE id = ?2",
        params![note, cur.id],
    )?;
    // A replica out of retries ends its part in the group's vote.
    if let (JobState::Failed, Some(group)) = (state, cur.replica_of) {
        validate_group(tx, group)?;
    }
    tracing::info!(job = cur.id, attempt = cur.attempt, %state, "{note}");
    Ok(state)
}

/// One replica of a group, as [`validate_group`] weighs it.
struct Replica {
    id: JobId,
    fin: bool,
    /// Whether it won the vote before (a decided vote stays decided).
    was_valid: bool,
    /// A done replica's outputs: paths and sha256s, sorted.
    outputs: Option<Vec<(String, Sha256)>>,
}

/// The replicas of `group` (its first replica's id) against its quorum. Two done replicas
/// agree when their outputs (paths and sha256s) are the same or, for a job with a validator,
/// when its command said so (the `agreements` table). The first done replica that agrees with
/// enough others to make a quorum wins (one that won before comes first, so that a late
/// replica cannot overturn a decided vote when `quorum` lets two sets of results win): it and
/// every done replica that agrees with it are `valid`, other done ones `outvoted`; once every
/// replica is final without a quorum, all are `no-quorum`; otherwise they stay `pending`.
/// Nothing changes while the validator has not yet compared two done replicas. Called
/// whenever a replica ends or a verdict comes in.
fn validate_group(tx: &Transaction<'_>, group: JobId) -> Result<(), QueueError> {
    // Every replica carries the same spec: the group's first says the quorum.
    let spec: String =
        tx.query_row_cached("SELECT spec FROM jobs WHERE id = ?1", [group], |r| r.get(0))?;
    let spec: JobSpec = from_json(&spec)?;
    let Some(rep) = spec.replication else {
        return Ok(());
    };
    let mut stmt = tx.prepare_cached(
        "SELECT id, state, files, validation FROM jobs WHERE replica_of = ?1 ORDER BY id",
    )?;
    let rows = stmt
        .query_map([group], |r| {
            Ok((
                r.get::<_, JobId>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut replicas = Vec::with_capacity(rows.len());
    for (id, state, files, validation) in rows {
        let state = parse_state(&state)?;
        let outputs = match (state, files) {
            (JobState::Done, Some(files)) => {
                let files: Vec<FileView> = from_json(&files)?;
                let mut sums: Vec<(String, Sha256)> =
                    files.into_iter().map(|f| (f.path, f.sha256)).collect();
                sums.sort();
                Some(sums)
            }
            _ => None,
        };
        replicas.push(Replica {
            id,
            fin: state.is_final(),
            was_valid: validation.as_deref() == Some(Validation::Valid.as_str()),
            outputs,
        });
    }
    let verdicts: BTreeMap<(JobId, JobId), bool> = if rep.validator.is_some() {
        tx.prepare_cached(
            "SELECT a, b, same FROM agreements
             WHERE a IN (SELECT id FROM jobs WHERE replica_of = ?1)",
        )?
        .query_map([group], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?
        .collect::<Result<_, _>>()?
    } else {
        BTreeMap::new()
    };
    let done: Vec<&Replica> = replicas.iter().filter(|r| r.outputs.is_some()).collect();
    // agree[i][j]: whether done[i] and done[j] agree.
    let mut agree = vec![vec![true; done.len()]; done.len()];
    for (i, a) in done.iter().enumerate() {
        for (j, b) in done.iter().enumerate().skip(i + 1) {
            let same = if a.outputs == b.outputs {
                true
            } else if rep.validator.is_some() {
                match verdicts.get(&(a.id.min(b.id), a.id.max(b.id))) {
                    Some(same) => *same,
                    // Not compared yet: decide nothing.
                    None => return Ok(()),
                }
            } else {
                false
            };
            (agree[i][j], agree[j][i]) = (same, same);
        }
    }
    let quorum = rep.quorum as usize;
    let has_quorum = |i: &usize| agree[*i].iter().filter(|s| **s).count() >= quorum;
    let winner = (0..done.len())
        .filter(|i| done[*i].was_valid)
        .find(has_quorum)
        .or_else(|| (0..done.len()).find(has_quorum));
    let all_final = replicas.iter().all(|r| r.fin);
    for r in &replicas {
        let v = match (winner, done.iter().position(|d| d.id == r.id)) {
            (Some(w), Some(i)) if agree[w][i] => Validation::Valid,
            (Some(_), Some(_)) => Validation::Outvoted,
            (Some(_), None) => Validation::Pending,
            (None, _) if all_final => Validation::NoQuorum,
            (None, _) => Validation::Pending,
        };
        tx.execute_cached(
            "UPDATE jobs SET validation = ?1 WHERE id = ?2",
            params![v.as_str(), r.id],
        )?;
    }
    if let Some(w) = winner {
        tracing::info!(
            group,
            quorum,
            winner = done[w].id,
            "replicated job validated"
        );
    }
    Ok(())
}

fn view(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<JobView, QueueError>> {
    let state: String = r.get("state")?;
    let outcome: Option<String> = r.get("outcome")?;
    let sha: Option<String> = r.get("archive_sha")?;
    let size: Option<u64> = r.get("archive_size")?;
    let files: Option<String> = r.get("files")?;
    let timings: Option<String> = r.get("timings")?;
    let sandbox: Option<String> = r.get("sandbox")?;
    let archive_url: Option<String> = r.get("archive_url")?;
    let spec: String = r.get("spec")?;
    let replica_of: Option<JobId> = r.get("replica_of")?;
    let validation: Option<String> = r.get("validation")?;
    let (id, name, attempt, max_retries, agent, created, updated, note) = (
        r.get("id")?,
        r.get("name")?,
        r.get("attempt")?,
        r.get("max_retries")?,
        r.get("agent")?,
        r.get("created")?,
        r.get("updated")?,
        r.get("note")?,
    );
    Ok((|| {
        Ok(JobView {
            id,
            name,
            state: parse_state(&state)?,
            attempt,
            max_retries,
            agent,
            created_ms: created,
            updated_ms: updated,
            outcome: outcome.as_deref().map(from_json).transpose()?,
            archive: match (sha, size) {
                (Some(sha), Some(size)) => Some(Stored {
                    sha256: parse_sha(&sha)?,
                    size,
                }),
                _ => None,
            },
            archive_url,
            files: files
                .as_deref()
                .map(from_json)
                .transpose()?
                .unwrap_or_default(),
            timings_ms: timings.as_deref().map(from_json).transpose()?,
            sandbox: sandbox.as_deref().map(from_json).transpose()?,
            note,
            replica: match (replica_of, validation.as_deref()) {
                (Some(group), Some(v)) => Some(ReplicaView {
                    group,
                    validation: Validation::parse(v)
                        .ok_or_else(|| corrupt(format!("job {id}: validation {v:?}")))?,
                    verdicts: Vec::new(),
                }),
                _ => None,
            },
            spec: from_json(&spec)?,
        })
    })())
}

impl Queue {
    /// Open (or create) the queue database at `path`, using the system clock.
    pub fn open(path: &Path) -> Result<Queue, QueueError> {
        Self::open_with_clock(path, Arc::new(now_ms))
    }

    /// Open (or create) the queue database at `path`, taking the time from `clock`.
    pub fn open_with_clock(path: &Path, clock: Clock) -> Result<Queue, QueueError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(corrupt(format!(
                "cannot switch {} to WAL mode (got {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrate(&mut conn)?;
        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(Duration::from_secs(5))?;
        Ok(Queue {
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
            clock,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a transaction half-done: an open
        // transaction rolls back when dropped. Keep serving.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` in one IMMEDIATE transaction (so concurrent writers wait rather than fail).
    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>, u64) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let now = (self.clock)();
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx, now)?;
        tx.commit()?;
        Ok(out)
    }

    /// Queue `specs` (already validated) in order; returns their ids.
    pub fn submit(
        &self,
        specs: &[JobSpec],
        default_max_retries: u32,
    ) -> Result<Vec<JobId>, QueueError> {
        self.write(|tx, now| {
            let mut ids = Vec::with_capacity(specs.len());
            let mut insert = tx.prepare_cached(
                "INSERT INTO jobs (name, spec, state, max_retries, created, updated)
                 VALUES (?1, ?2, 'queued', ?3, ?4, ?4)",
            )?;
            for spec in specs {
                let retries = spec.max_retries.unwrap_or(default_max_retries);
                let copies = spec.replication.as_ref().map_or(1, |r| r.replicas);
                let mut group = None;
                for _ in 0..copies {
                    insert.execute(params![spec.name, to_json(spec)?, retries, now])?;
                    let id = tx.last_insert_rowid() as JobId;
                    tx.execute_cached(
                        "INSERT INTO events (job, attempt, from_state, to_state, at, why)
                         VALUES (?1, 0, 'new', 'queued', ?2, 'submitted')",
                        params![id, now],
                    )?;
                    if spec.replication.is_some() {
                        let leader = *group.get_or_insert(id);
                        tx.execute_cached(
                            "UPDATE jobs SET replica_of = ?1, validation = 'pending' WHERE id = ?2",
                            params![leader, id],
                        )?;
                    }
                    ids.push(id);
                }
            }
            Ok(ids)
        })
    }

    /// The oldest queued job → assigned to `agent`, computing for the BOINC user `boinc_user`
    /// when known, attempt += 1, a fresh upload token, lease deadline now + `lease`, token
    /// expiry now + `token_ttl`.
    pub fn claim(
        &self,
        agent: &str,
        boinc_user: Option<u64>,
        lease: Duration,
        token_ttl: Duration,
    ) -> Result<Option<Claim>, QueueError> {
        // Ids beyond SQLite's integer range cannot be real BOINC ids: such a user is unknown.
        let boinc_user = boinc_user.and_then(|u| i64::try_from(u).ok());
        self.write(|tx, now| {
            let row: Option<(JobId, String, u32, String)> = tx
                .query_row_cached(
                    // A replica never goes to an agent, or a BOINC user, that holds or ran
                    // another of its group.
                    "SELECT id, state, attempt, spec FROM jobs WHERE state = 'queued'
                     AND (replica_of IS NULL OR NOT EXISTS (
                         SELECT 1 FROM jobs AS sibling WHERE sibling.replica_of = jobs.replica_of
                         AND sibling.id != jobs.id
                         AND (sibling.agent = ?1 OR sibling.boinc_user = ?2)))
                     ORDER BY id LIMIT 1",
                    params![agent, boinc_user],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let Some((job, state, attempt, spec)) = row else {
                return Ok(None);
            };
            let spec: JobSpec = from_json(&spec)?;
            let attempt = attempt + 1;
            let why = format!("assigned to {agent}");
            set_state(
                tx,
                job,
                attempt,
                parse_state(&state)?,
                JobState::Assigned,
                &why,
                now,
            )?;
            let upload_token = new_token();
            tx.execute_cached(
                "UPDATE jobs SET attempt = ?1, agent = ?2, lease_until = ?3, token = ?4,
                        token_until = ?5, archive_attempt = NULL, archive_sha = NULL,
                        archive_size = NULL, archive_url = NULL, upload_url = NULL,
                        boinc_user = ?6
                 WHERE id = ?7",
                params![
                    attempt,
                    agent,
                    deadline(now, lease),
                    upload_token,
                    deadline(now, token_ttl),
                    boinc_user,
                    job
                ],
            )?;
            Ok(Some(Claim {
                job,
                attempt,
                spec,
                upload_token,
            }))
        })
    }

    /// Renew the lease of `agent` on `job`/`attempt`; [`Phase::Running`] and
    /// [`Phase::Uploading`] move the job forward (never back: progress messages may be reordered).
    pub fn progress(
        &self,
        agent: &str,
        job: JobId,
        attempt: u32,
        phase: Phase,
        lease: Duration,
    ) -> Result<(), QueueError> {
        self.write(|tx, now| {
            let cur = load(tx, job)?.ok_or(QueueError::UnknownJob(job))?;
            if !cur.holds(agent, attempt) {
                return Err(QueueError::StaleLease { job, attempt });
            }
            let target = match phase {
                Phase::Staging => JobState::Assigned,
                Phase::Running => JobState::Running,
                Phase::Uploading => JobState::Uploading,
            };
            // Leased states are ordered assigned < running < uploading.
            if target > cur.state {
                set_state(tx, job, attempt, cur.state, target, "progress", now)?;
            }
            tx.execute_cached(
                "UPDATE jobs SET lease_until = ?1, updated = ?2 WHERE id = ?3",
                params![deadline(now, lease), now, job],
            )?;
            Ok(())
        })
    }

    /// Record a done report; see the contract. A report is recorded at most once: a
    /// retransmission by the same agent is [`Completion::Duplicate`], anything else not holding
    /// the lease is [`QueueError::StaleLease`].
    pub fn complete(&self, agent: &str, report: &DoneReport) -> Result<Completion, QueueError> {
        let (job, attempt) = (report.job, report.attempt);
        self.write(|tx, now| {
            let cur = load(tx, job)?.ok_or(QueueError::UnknownJob(job))?;
            if !cur.holds(agent, attempt) {
                let by: Option<String> = tx
                    .query_row_cached(
                        "SELECT agent FROM reports WHERE job = ?1 AND attempt = ?2",
                        params![job, attempt],
                        |r| r.get(0),
                    )
                    .optional()?;
                return match by {
                    Some(by) if by == agent => Ok(Completion::Duplicate),
                    _ => Err(QueueError::StaleLease { job, attempt }),
                };
            }
            let outcome = checked_outcome(&cur, report)?;
            // A retryable failure goes through lose(), which settles a replica's group itself.
            let lost = !outcome.succeeded() && outcome.is_retryable();
            let state = if outcome.succeeded() {
                set_state(
                    tx,
                    job,
                    attempt,
                    cur.state,
                    JobState::Done,
                    "succeeded",
                    now,
                )?
            } else if outcome.is_retryable() {
                lose(tx, &cur, &outcome.describe(), now)?
            } else {
                set_state(
                    tx,
                    job,
                    attempt,
                    cur.state,
                    JobState::Failed,
                    &outcome.describe(),
                    now,
                )?
            };
            let files: Vec<FileView> = report
                .files
                .iter()
                .map(|f| FileView {
                    path: f.path.clone(),
                    size: f.size,
                    sha256: f.sha256,
                })
                .collect();
            let t = report.timings;
            let note = match state {
                JobState::Done => None,
                JobState::Failed if !outcome.is_retryable() => Some(outcome.describe()),
                // lose() wrote the note.
                _ => {
                    tx.query_row_cached("SELECT note FROM jobs WHERE id = ?1", [job], |r| r.get(0))?
                }
            };
            tx.execute_cached(
                "UPDATE jobs SET outcome = ?1, files = ?2, timings = ?3, note = ?4, sandbox = ?5,
                        lease_until = NULL, token = NULL, token_until = NULL
                 WHERE id = ?6",
                params![
                    to_json(&outcome_view(&outcome))?,
                    to_json(&files)?,
                    to_json(&[t.stage_in_ms, t.run_ms, t.stage_out_ms])?,
                    note,
                    (!report.sandbox.is_empty())
                        .then(|| to_json(&report.sandbox))
                        .transpose()?,
                    job
                ],
            )?;
            tx.execute_cached(
                "INSERT INTO reports (job, attempt, agent, state, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![job, attempt, agent, state.as_str(), now],
            )?;
            if let (JobState::Done, Some(v)) = (state, &report.volunteer) {
                credit(tx, v, report.timings.cpu_ms.unwrap_or(0), now)?;
            }
            if let (false, true, Some(group)) = (lost, state.is_final(), cur.replica_of) {
                validate_group(tx, group)?;
            }
            tracing::info!(job, attempt, agent, %state, "{}", outcome.describe());
            Ok(Completion::Recorded(state))
        })
    }

    /// Up to `limit` pairs of done replicas, of jobs that name a validator, with a replica
    /// still pending, different outputs (equal ones agree without asking) and no verdict yet,
    /// in the order of (`a`, `b`) and after the pair `after` (`(0, 0)`: from the first).
    pub fn comparisons_due(
        &self,
        after: (JobId, JobId),
        limit: u32,
    ) -> Result<Vec<Comparison>, QueueError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT p.replica_of, MIN(p.id, o.id), MAX(p.id, o.id),
                    json_extract(p.spec, '$.replication.validator')
             FROM jobs AS p JOIN jobs AS o ON o.replica_of = p.replica_of AND o.id != p.id
             WHERE p.validation = 'pending' AND p.state = 'done' AND o.state = 'done'
               AND p.files IS NOT o.files
               AND json_extract(p.spec, '$.replication.validator') IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM agreements AS g
                               WHERE g.a = MIN(p.id, o.id) AND g.b = MAX(p.id, o.id))
               AND (MIN(p.id, o.id), MAX(p.id, o.id)) > (?1, ?2)
             ORDER BY 2, 3 LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![after.0, after.1, limit], |r| {
                Ok(Comparison {
                    group: r.get(0)?,
                    a: r.get(1)?,
                    b: r.get(2)?,
                    validator: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Record what the validator said of the two replicas of `c` (`detail`: its words, for
    /// people), and weigh their group again.
    pub fn record_verdict(
        &self,
        c: &Comparison,
        same: bool,
        detail: &str,
    ) -> Result<(), QueueError> {
        self.write(|tx, now| {
            tx.execute_cached(
                "INSERT OR IGNORE INTO agreements (a, b, same, detail, at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![c.a, c.b, same, detail, now],
            )?;
            validate_group(tx, c.group)
        })
    }

    /// Leases past their deadline → lost → queued/failed. Returns (job, new state).
    pub fn expire_leases(&self) -> Result<Vec<(JobId, JobState)>, QueueError> {
        self.write(|tx, now| {
            let ids = ids_where(tx, &format!("lease_until < {now}"), [])?;
            ids.into_iter()
                .map(|id| {
                    let cur = load(tx, id)?.ok_or(QueueError::UnknownJob(id))?;
                    let why = format!(
                        "lease expired, no progress from {}",
                        cur.agent.as_deref().unwrap_or("?")
                    );
                    Ok((id, lose(tx, &cur, &why, now)?))
                })
                .collect()
        })
    }

    /// Every lease `agent` holds → lost → queued/failed. Returns (job, new state).
    pub fn release_agent(
        &self,
        agent: &str,
        why: &str,
    ) -> Result<Vec<(JobId, JobState)>, QueueError> {
        self.write(|tx, now| {
            let ids = ids_where(tx, "agent = ?1", [agent])?;
            ids.into_iter()
                .map(|id| {
                    let cur = load(tx, id)?.ok_or(QueueError::UnknownJob(id))?;
                    Ok((id, lose(tx, &cur, &format!("{agent}: {why}"), now)?))
                })
                .collect()
        })
    }

    /// Number of jobs waiting for an agent.
    pub fn queued_count(&self) -> Result<u64, QueueError> {
        let conn = self.lock();
        Ok(conn.query_row(
            "SELECT COUNT(*) FROM jobs WHERE state = 'queued'",
            [],
            |r| r.get(0),
        )?)
    }

    /// One job, if it exists.
    pub fn job(&self, id: JobId) -> Result<Option<JobView>, QueueError> {
        if !storable(id) {
            return Ok(None);
        }
        let conn = self.lock();
        let Some(mut job) = conn
            .query_row_cached("SELECT * FROM jobs WHERE id = ?1", [id], view)
            .optional()?
            .transpose()?
        else {
            return Ok(None);
        };
        if let Some(r) = &mut job.replica {
            r.verdicts = conn
                .prepare_cached(
                    "SELECT a, b, same, detail FROM agreements WHERE a = ?1
                     UNION ALL SELECT a, b, same, detail FROM agreements WHERE b = ?1
                     ORDER BY 1, 2",
                )?
                .query_map([id], |row| {
                    let (a, b): (JobId, JobId) = (row.get(0)?, row.get(1)?);
                    Ok(VerdictView {
                        other: if a == id { b } else { a },
                        same: row.get(2)?,
                        detail: row.get(3)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
        }
        Ok(Some(job))
    }

    /// All jobs (or those in `state`), oldest first, and the count in every state.
    pub fn list(&self, state: Option<JobState>) -> Result<JobList, QueueError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT * FROM jobs WHERE ?1 IS NULL OR state = ?1 ORDER BY id")?;
        let jobs = stmt
            .query_map([state.map(JobState::as_str)], view)?
            .map(|r| r?)
            .collect::<Result<Vec<_>, QueueError>>()?;
        let counts = counts(&conn)?;
        Ok(JobList { jobs, counts })
    }

    /// Credit per BOINC user and host, by user then host.
    pub fn volunteers(&self) -> Result<VolunteerList, QueueError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT user_id, host_id, team_id, host_token, jobs, cpu_ms, updated FROM credit
             ORDER BY user_id, host_id",
        )?;
        let volunteers = stmt
            .query_map([], |r| {
                let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok(VolunteerCredit {
                    user_id: n(0)?,
                    host_id: n(1)?,
                    team_id: n(2)?,
                    host_token: r.get(3)?,
                    jobs_done: n(4)?,
                    cpu_seconds: n(5)? as f64 / 1000.0,
                    updated_ms: n(6)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VolunteerList { volunteers })
    }

    /// The number of jobs in every state (0 for states without jobs).
    pub fn counts(&self) -> Result<BTreeMap<JobState, u64>, QueueError> {
        counts(&self.lock())
    }

    /// Check an upload token for `job`/`attempt` (matching, unexpired, lease current) and move
    /// the job to uploading. Unknown job → [`QueueError::UnknownJob`]; otherwise
    /// [`QueueError::TokenInvalid`].
    pub fn authorize_upload(
        &self,
        job: JobId,
        attempt: u32,
        token: &str,
    ) -> Result<(), QueueError> {
        self.write(|tx, now| {
            let cur = load(tx, job)?.ok_or(QueueError::UnknownJob(job))?;
            let valid = cur.state.is_leased()
                && cur.attempt == attempt
                && cur.token.as_deref().is_some_and(|t| same_token(t, token))
                && cur.token_until.is_some_and(|until| now < until);
            if !valid {
                return Err(QueueError::TokenInvalid);
            }
            if cur.state != JobState::Uploading {
                set_state(
                    tx,
                    job,
                    attempt,
                    cur.state,
                    JobState::Uploading,
                    "upload",
                    now,
                )?;
            }
            Ok(())
        })
    }

    /// Record the archive the storage service stored for `job`/`attempt` (its lease must still be
    /// current, else [`QueueError::StaleLease`]).
    pub fn record_archive(
        &self,
        job: JobId,
        attempt: u32,
        stored: Stored,
    ) -> Result<(), QueueError> {
        self.record_archive_at(job, attempt, stored, None)
    }

    /// [`Queue::record_archive`] for an archive kept elsewhere than the manager's own store:
    /// `url` says where (a Chirp URL).
    pub fn record_archive_at(
        &self,
        job: JobId,
        attempt: u32,
        stored: Stored,
        url: Option<&str>,
    ) -> Result<(), QueueError> {
        self.write(|tx, now| {
            let cur = load(tx, job)?.ok_or(QueueError::UnknownJob(job))?;
            if !(cur.state.is_leased() && cur.attempt == attempt) {
                return Err(QueueError::StaleLease { job, attempt });
            }
            tx.execute_cached(
                "UPDATE jobs SET archive_attempt = ?1, archive_sha = ?2, archive_size = ?3,
                        archive_url = ?4, updated = ?5 WHERE id = ?6",
                params![
                    attempt,
                    stored.sha256.to_string(),
                    stored.size,
                    url,
                    now,
                    job
                ],
            )?;
            Ok(())
        })
    }

    /// The attempt of `job` uploads to `url` (a Chirp URL) instead of the storage service.
    pub fn set_upload_url(&self, job: JobId, attempt: u32, url: &str) -> Result<(), QueueError> {
        self.write(|tx, _| {
            let n = tx.execute_cached(
                &format!(
                    "UPDATE jobs SET upload_url = ?1 WHERE id = ?2 AND attempt = ?3
                     AND state IN {LEASED}"
                ),
                params![url, job, attempt],
            )?;
            if n == 0 {
                return Err(QueueError::StaleLease { job, attempt });
            }
            Ok(())
        })
    }

    /// Where `job`/`attempt` uploads, if not to the storage service (and the lease is current).
    pub fn upload_url_of(&self, job: JobId, attempt: u32) -> Result<Option<String>, QueueError> {
        if !storable(job) {
            return Ok(None);
        }
        let conn = self.lock();
        let url: Option<Option<String>> = conn
            .query_row_cached(
                &format!(
                    "SELECT upload_url FROM jobs WHERE id = ?1 AND attempt = ?2
                     AND state IN {LEASED}"
                ),
                params![job, attempt],
                |r| r.get(0),
            )
            .optional()?;
        Ok(url.flatten())
    }

    /// Where the archive of `job` is kept, if not in the manager's own store.
    pub fn archive_url_of(&self, job: JobId) -> Result<Option<String>, QueueError> {
        if !storable(job) {
            return Ok(None);
        }
        let conn = self.lock();
        let url: Option<Option<String>> = conn
            .query_row_cached("SELECT archive_url FROM jobs WHERE id = ?1", [job], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(url.flatten())
    }

    /// The stored archive of `job` and the attempt that produced it, if any.
    pub fn archive_of(&self, job: JobId) -> Result<Option<(u32, Stored)>, QueueError> {
        if !storable(job) {
            return Ok(None);
        }
        let conn = self.lock();
        let row: Option<(Option<u32>, Option<String>, Option<u64>)> = conn
            .query_row_cached(
                "SELECT archive_attempt, archive_sha, archive_size FROM jobs WHERE id = ?1",
                [job],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        match row {
            None => Err(QueueError::UnknownJob(job)),
            Some((Some(attempt), Some(sha), Some(size))) => Ok(Some((
                attempt,
                Stored {
                    sha256: parse_sha(&sha)?,
                    size,
                },
            ))),
            Some(_) => Ok(None),
        }
    }

    /// Whether `token` is a currently valid upload token of a leased job listing input `sha256`.
    pub fn token_may_read_input(&self, token: &str, sha256: &Sha256) -> Result<bool, QueueError> {
        let now = (self.clock)();
        let conn = self.lock();
        let spec: Option<String> = conn
            .query_row_cached(
                &format!(
                    "SELECT spec FROM jobs WHERE token = ?1 AND token_until > ?2
                     AND state IN {LEASED}"
                ),
                params![token, now],
                |r| r.get(0),
            )
            .optional()?;
        let Some(spec) = spec else {
            return Ok(false);
        };
        let spec: JobSpec = from_json(&spec)?;
        Ok(spec
            .inputs
            .iter()
            .any(|i| matches!(&i.source, InputSource::Stored { sha256: s, .. } if s == sha256)))
    }
}

/// One row of the `events` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    pub id: i64,
    pub job: JobId,
    pub attempt: u32,
    /// `new` for the submission.
    pub from: String,
    pub to: JobState,
    pub at: u64,
    pub why: String,
}

/// Reads for people (the dashboard and the summary API), on the read-only connection: none of
/// them writes or takes the lock the dispatch path uses. Each is one statement over an index or
/// the row id, except the batch, failure and contribution summaries, which scan the jobs and
/// reports tables once.
impl Queue {
    fn read(&self) -> MutexGuard<'_, Connection> {
        // A read-only connection holds no transaction between calls: keep serving.
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to `limit` events after event `after`, oldest first (the row id orders them).
    pub fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRow>, QueueError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT id, job, attempt, from_state, to_state, at, why FROM events
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit], event_row)?;
        rows.map(|r| r?).collect()
    }

    /// Every event of `job`, oldest first.
    pub fn job_events(&self, job: JobId) -> Result<Vec<EventRow>, QueueError> {
        if !storable(job) {
            return Ok(Vec::new());
        }
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT id, job, attempt, from_state, to_state, at, why FROM events
             WHERE job = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([job], event_row)?;
        rows.map(|r| r?).collect()
    }

    /// The id of the latest event (0 before the first): it changes whenever a job does.
    pub fn last_event_id(&self) -> Result<i64, QueueError> {
        let conn = self.read();
        Ok(conn.query_row_cached("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?)
    }

    /// The newest `limit` jobs, newest first.
    pub fn recent(&self, limit: u32) -> Result<Vec<JobView>, QueueError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached("SELECT * FROM jobs ORDER BY id DESC LIMIT ?1")?;
        let jobs = stmt.query_map([limit], view)?;
        jobs.map(|r| r?).collect()
    }

    /// The jobs of batch `name` (named `name#0`, `name#1`, …, or `name` itself), by id.
    pub fn batch_jobs(&self, name: &str) -> Result<Vec<JobView>, QueueError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM jobs WHERE name = ?1
             OR (substr(name, 1, length(?1) + 1) = ?1 || '#'
                 AND length(name) > length(?1) + 1
                 AND substr(name, length(?1) + 2) NOT GLOB '*[^0-9]*')
             ORDER BY id",
        )?;
        let jobs = stmt.query_map([name], view)?;
        jobs.map(|r| r?).collect()
    }

    /// Every batch with its counts by state, newest first.
    pub fn batches(&self) -> Result<Vec<BatchSummary>, QueueError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT name, state, COUNT(*), MIN(id), MAX(id), MAX(updated) FROM jobs
             GROUP BY name, state",
        )?;
        let mut by_name: BTreeMap<String, BatchSummary> = BTreeMap::new();
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u64>(2)?,
                r.get::<_, JobId>(3)?,
                r.get::<_, JobId>(4)?,
                r.get::<_, u64>(5)?,
            ))
        })?;
        for row in rows {
            let (name, state, n, first, last, updated) = row?;
            let batch = batch_of(&name).to_owned();
            let b = by_name
                .entry(batch.clone())
                .or_insert_with(|| BatchSummary {
                    name: batch,
                    jobs: 0,
                    counts: JobState::ALL.iter().map(|s| (*s, 0)).collect(),
                    first_id: first,
                    last_id: last,
                    updated_ms: updated,
                });
            b.jobs += n;
            *b.counts.entry(parse_state(&state)?).or_default() += n;
            b.first_id = b.first_id.min(first);
            b.last_id = b.last_id.max(last);
            b.updated_ms = b.updated_ms.max(updated);
        }
        let mut list: Vec<BatchSummary> = by_name.into_values().collect();
        list.sort_by_key(|b| std::cmp::Reverse(b.last_id));
        Ok(list)
    }

    /// Failed jobs by cause, most frequent first (see [`failure_cause`]).
    pub fn failure_causes(&self) -> Result<Vec<CauseCount>, QueueError> {
        let conn = self.read();
        let mut stmt =
            conn.prepare_cached("SELECT outcome, note FROM jobs WHERE state = 'failed'")?;
        let mut causes: BTreeMap<String, u64> = BTreeMap::new();
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?,
                r.get::<_, Option<String>>(1)?,
            ))
        })?;
        for row in rows {
            let (outcome, note) = row?;
            let outcome: Option<OutcomeView> = outcome.as_deref().map(from_json).transpose()?;
            *causes
                .entry(failure_cause(outcome.as_ref(), note.as_deref()))
                .or_default() += 1;
        }
        Ok(by_count(causes))
    }

    /// What each agent did, from the recorded reports: jobs done and failed, host failures, and
    /// the run time of its done jobs; most jobs done first.
    pub fn host_contributions(&self) -> Result<Vec<HostContribution>, QueueError> {
        let conn = self.read();
        let mut hosts: BTreeMap<String, HostContribution> = BTreeMap::new();
        let mut stmt = conn
            .prepare_cached("SELECT agent, state, COUNT(*) FROM reports GROUP BY agent, state")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u64>(2)?,
            ))
        })?;
        let mut counted = Vec::new();
        for row in rows {
            counted.push(row?);
        }
        let mut stmt = conn.prepare_cached(
            "SELECT agent, SUM(json_extract(timings, '$[1]')) FROM jobs
             WHERE state = 'done' AND agent IS NOT NULL GROUP BY agent",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<f64>>(1)?))
        })?;
        let mut run = Vec::new();
        for row in rows {
            run.push(row?);
        }
        for (agent, state, n) in counted {
            let h = hosts
                .entry(agent.clone())
                .or_insert_with(|| new_host(agent));
            match parse_state(&state)? {
                JobState::Done => h.jobs_done += n,
                JobState::Failed => h.jobs_failed += n,
                _ => h.host_failures += n,
            }
        }
        for (agent, ms) in run {
            let h = hosts
                .entry(agent.clone())
                .or_insert_with(|| new_host(agent));
            h.run_seconds += ms.unwrap_or(0.0) / 1000.0;
        }
        let mut list: Vec<HostContribution> = hosts.into_values().collect();
        list.sort_by(|a, b| {
            b.jobs_done
                .cmp(&a.jobs_done)
                .then_with(|| a.agent.cmp(&b.agent))
        });
        Ok(list)
    }
}

fn new_host(agent: String) -> HostContribution {
    HostContribution {
        agent,
        jobs_done: 0,
        jobs_failed: 0,
        host_failures: 0,
        run_seconds: 0.0,
        volunteer: None,
    }
}

fn event_row(r: &Row<'_>) -> rusqlite::Result<Result<EventRow, QueueError>> {
    let to: String = r.get(4)?;
    let row = (
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(5)?,
        r.get(6)?,
    );
    Ok(parse_state(&to).map(|to| EventRow {
        id: row.0,
        job: row.1,
        attempt: row.2,
        from: row.3,
        to,
        at: row.4,
        why: row.5,
    }))
}

/// Counts by cause, most frequent first (then by name).
pub fn by_count(causes: BTreeMap<String, u64>) -> Vec<CauseCount> {
    let mut list: Vec<CauseCount> = causes
        .into_iter()
        .map(|(cause, count)| CauseCount { cause, count })
        .collect();
    list.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.cause.cmp(&b.cause)));
    list
}

/// Why an attempt was lost, from the reason the queue logged (see [`lose`]): one of a few
/// fixed causes.
pub fn lost_cause(why: &str) -> &'static str {
    if why.starts_with("lease expired") {
        "lease expired"
    } else if why.ends_with("agent went offline") {
        "agent went offline"
    } else if why.starts_with("stage-in failed") {
        "stage-in failed"
    } else if why.starts_with("setup failed") {
        "setup failed"
    } else if why.starts_with("stage-out failed") {
        "stage-out failed"
    } else {
        "other"
    }
}

/// Why a job failed for good: its payload's outcome (`exit 3`, `cpu limit`, …), or, when its
/// last attempt was lost with no retry left, `retries used up (<lost cause>)`.
pub fn failure_cause(outcome: Option<&OutcomeView>, note: Option<&str>) -> String {
    // lose() writes "attempt N lost (WHY); no retries left of M".
    if let Some(why) = note
        .filter(|n| n.contains("; no retries left of "))
        .and_then(|n| n.split_once(" lost (").map(|(_, rest)| rest))
        .and_then(|rest| {
            rest.rsplit_once("); no retries left of ")
                .map(|(why, _)| why)
        })
    {
        return format!("retries used up ({})", lost_cause(why));
    }
    outcome.map_or_else(|| "unknown".into(), OutcomeView::short)
}

/// Ids of leased jobs matching `cond`.
fn ids_where<P: rusqlite::Params>(
    tx: &Transaction<'_>,
    cond: &str,
    p: P,
) -> Result<Vec<JobId>, QueueError> {
    let mut stmt = tx.prepare(&format!(
        "SELECT id FROM jobs WHERE state IN {LEASED} AND {cond} ORDER BY id"
    ))?;
    let ids = stmt
        .query_map(p, |r| r.get(0))?
        .collect::<Result<Vec<JobId>, _>>()?;
    Ok(ids)
}

/// The report's outcome, except that a success whose archive does not match what the storage
/// service recorded becomes [`Outcome::StageOutFailed`].
fn counts(conn: &Connection) -> Result<BTreeMap<JobState, u64>, QueueError> {
    let mut counts: BTreeMap<JobState, u64> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
    let mut stmt = conn.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))? {
        let (s, n) = row?;
        counts.insert(parse_state(&s)?, n);
    }
    Ok(counts)
}

/// Credit one done job and its CPU time to the volunteer's user and host. Ids beyond SQLite's
/// integer range cannot be real BOINC ids: such a report is recorded without credit.
fn credit(tx: &Transaction<'_>, v: &Volunteer, cpu_ms: u64, now: u64) -> Result<(), QueueError> {
    let (Ok(user), Ok(host), Ok(team)) = (
        i64::try_from(v.user_id),
        i64::try_from(v.host_id),
        i64::try_from(v.team_id),
    ) else {
        tracing::warn!(?v, "volunteer ids out of range; no credit");
        return Ok(());
    };
    let cpu_ms = i64::try_from(cpu_ms).unwrap_or(i64::MAX);
    tx.execute_cached(
        "INSERT INTO credit (user_id, host_id, team_id, host_token, jobs, cpu_ms, updated)
         VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6)
         ON CONFLICT (user_id, host_id) DO UPDATE SET
             team_id = excluded.team_id,
             host_token = COALESCE(excluded.host_token, host_token),
             jobs = jobs + 1,
             cpu_ms = MIN(cpu_ms + excluded.cpu_ms, 9223372036854775807),
             updated = excluded.updated",
        params![user, host, team, v.host_token, cpu_ms, now],
    )?;
    Ok(())
}

fn checked_outcome(cur: &Current, report: &DoneReport) -> Result<Outcome, QueueError> {
    if !report.outcome.succeeded() {
        return Ok(report.outcome.clone());
    }
    let problem = match (report.archive, cur.archive) {
        (Some((sha, size)), Some(st)) if st.sha256 == sha && st.size == size => None,
        (Some((sha, size)), Some(st)) => Some(format!(
            "reported archive {sha} ({size} bytes) differs from the stored {} ({} bytes)",
            st.sha256, st.size
        )),
        (Some((sha, _)), None) => Some(format!("reported archive {sha} was never stored")),
        (None, _) => {
            let spec: JobSpec = from_json(&cur.spec)?;
            (!spec.outputs.is_empty())
                .then(|| "no archive was uploaded although the job declares outputs".to_owned())
        }
    };
    Ok(match problem {
        None => report.outcome.clone(),
        Some(p) => {
            tracing::warn!(job = cur.id, attempt = cur.attempt, "{p}");
            Outcome::StageOutFailed(p)
        }
    })
}

/// The schema's steps: step `n` takes a database of version `n` to version `n + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    SCHEMA,
    CREDIT_SCHEMA,
    REPLICA_SCHEMA,
    VOLUNTEER_SCHEMA,
    AGREEMENT_SCHEMA,
];

fn migrate(conn: &mut Connection) -> Result<(), QueueError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let steps = usize::try_from(version)
        .ok()
        .and_then(|v| MIGRATIONS.get(v..))
        .ok_or_else(|| {
            corrupt(format!(
                "database schema version {version} is not {SCHEMA_VERSION}; use a matching manager"
            ))
        })?;
    if !steps.is_empty() {
        for step in steps {
            tx.execute_batch(step)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use copilot_protocol::job::JobInput;
    use copilot_protocol::sandbox::{Protection, SandboxReport};
    use copilot_protocol::wire::{FileDigest, Timings};

    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const TTL: Duration = Duration::from_secs(3600);

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        time: Arc<AtomicU64>,
        q: Queue,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("queue.db");
            let time = Arc::new(AtomicU64::new(1_000_000));
            let q = open(&path, &time);
            Fixture {
                _dir: dir,
                path,
                time,
                q,
            }
        }

        fn advance(&self, ms: u64) {
            self.time.fetch_add(ms, Ordering::SeqCst);
        }

        fn state(&self, id: JobId) -> JobState {
            self.q.job(id).unwrap().unwrap().state
        }

        fn count(&self, sql: &str) -> u64 {
            self.q.lock().query_row(sql, [], |r| r.get(0)).unwrap()
        }
    }

    fn open(path: &Path, time: &Arc<AtomicU64>) -> Queue {
        let t = time.clone();
        Queue::open_with_clock(path, Arc::new(move || t.load(Ordering::SeqCst))).unwrap()
    }

    fn spec(name: &str) -> JobSpec {
        JobSpec::new(name, &["true"])
    }

    fn report(c: &Claim, outcome: Outcome, archive: Option<Stored>) -> DoneReport {
        DoneReport {
            agent: "a1".into(),
            job: c.job,
            attempt: c.attempt,
            outcome,
            timings: Timings {
                stage_in_ms: 1,
                run_ms: 2,
                stage_out_ms: 3,
                cpu_ms: None,
            },
            archive: archive.map(|s| (s.sha256, s.size)),
            files: vec![FileDigest {
                path: "out.txt".into(),
                size: 2,
                sha256: Sha256::of(b"hi"),
            }],
            sandbox: SandboxReport {
                active: [Protection::Session].into(),
                missing: [Protection::Uid].into(),
            },
            volunteer: None,
            want_more: false,
        }
    }

    fn claim(f: &Fixture, agent: &str, lease: Duration) -> Claim {
        f.q.claim(agent, None, lease, TTL)
            .unwrap()
            .expect("a queued job")
    }

    const OK: Outcome = Outcome::Exited { code: 0 };

    #[test]
    fn claims_are_fifo_with_fresh_tokens() {
        let f = Fixture::new();
        let ids = f.q.submit(&[spec("a"), spec("b"), spec("c")], 3).unwrap();
        assert_eq!(f.q.queued_count().unwrap(), 3);
        let claims: Vec<Claim> = (0..3).map(|_| claim(&f, "ag", TTL)).collect();
        assert_eq!(claims.iter().map(|c| c.job).collect::<Vec<_>>(), ids);
        assert_eq!(claims[1].spec, spec("b"));
        assert!(claims.iter().all(|c| c.attempt == 1));
        assert!(claims.iter().all(|c| c.upload_token.len() == 64));
        assert_ne!(claims[0].upload_token, claims[1].upload_token);
        assert!(f.q.claim("ag", None, TTL, TTL).unwrap().is_none());
        assert_eq!(f.q.queued_count().unwrap(), 0);
        let v = f.q.job(ids[0]).unwrap().unwrap();
        assert_eq!(
            (v.state, v.agent.as_deref(), v.max_retries),
            (JobState::Assigned, Some("ag"), 3)
        );
    }

    #[test]
    fn leases_expire_only_after_their_deadline_and_progress_renews_them() {
        let f = Fixture::new();
        let id = f.q.submit(&[spec("a")], 3).unwrap()[0];
        let c = claim(&f, "ag", 10 * MS);
        f.advance(10);
        assert!(
            f.q.expire_leases().unwrap().is_empty(),
            "deadline itself is still valid"
        );
        f.q.progress("ag", id, 1, Phase::Running, 10 * MS).unwrap();
        assert_eq!(f.state(id), JobState::Running);
        f.advance(10);
        assert!(f.q.expire_leases().unwrap().is_empty());
        // A late, reordered staging message does not move the job back.
        f.q.progress("ag", id, 1, Phase::Staging, 10 * MS).unwrap();
        assert_eq!(f.state(id), JobState::Running);
        f.advance(11);
        assert_eq!(f.q.expire_leases().unwrap(), vec![(id, JobState::Queued)]);
        let v = f.q.job(id).unwrap().unwrap();
        assert!(v.note.unwrap().contains("lease expired"));
        // The old lease is gone: progress and reports of attempt 1 are stale.
        assert!(matches!(
            f.q.progress("ag", id, 1, Phase::Running, TTL),
            Err(QueueError::StaleLease { attempt: 1, .. })
        ));
        assert!(matches!(
            f.q.complete("ag", &report(&c, OK, None)),
            Err(QueueError::StaleLease { attempt: 1, .. })
        ));
        assert_eq!(claim(&f, "ag2", TTL).attempt, 2);
        assert!(matches!(
            f.q.progress("ag", 999, 1, Phase::Running, TTL),
            Err(QueueError::UnknownJob(999))
        ));
        // Ids beyond SQLite's row id range name no job (not a database error).
        let huge = u64::MAX;
        assert!(matches!(
            f.q.progress("ag", huge, 1, Phase::Running, TTL),
            Err(QueueError::UnknownJob(_))
        ));
        assert!(matches!(f.q.job(huge), Ok(None)));
        assert!(matches!(f.q.archive_of(huge), Ok(None)));
    }

    #[test]
    fn release_agent_requeues_only_its_jobs() {
        let f = Fixture::new();
        let ids = f.q.submit(&[spec("a"), spec("b"), spec("c")], 3).unwrap();
        claim(&f, "x", TTL);
        claim(&f, "y", TTL);
        claim(&f, "x", TTL);
        let released = f.q.release_agent("x", "went offline").unwrap();
        assert_eq!(
            released,
            vec![(ids[0], JobState::Queued), (ids[2], JobState::Queued)]
        );
        assert_eq!(f.state(ids[1]), JobState::Assigned);
        assert!(f.q.release_agent("x", "again").unwrap().is_empty());
        // Requeued jobs go out again oldest first.
        assert_eq!(claim(&f, "z", TTL).job, ids[0]);
    }

    #[test]
    fn retries_are_limited() {
        let f = Fixture::new();
        let mut one_retry = spec("a");
        one_retry.max_retries = Some(1);
        let id = f.q.submit(&[one_retry], 3).unwrap()[0];
        claim(&f, "x", TTL);
        assert_eq!(
            f.q.release_agent("x", "gone").unwrap(),
            vec![(id, JobState::Queued)]
        );
        let c = claim(&f, "x", TTL);
        assert_eq!(c.attempt, 2);
        let done =
            f.q.complete("x", &report(&c, Outcome::StageInFailed("404".into()), None));
        assert_eq!(done.unwrap(), Completion::Recorded(JobState::Failed));
        let v = f.q.job(id).unwrap().unwrap();
        assert_eq!(v.outcome.unwrap().kind, "stage-in-failed");
        assert!(
            v.note.unwrap().contains("no retries left"),
            "note explains the failure"
        );
        assert!(f.q.claim("x", None, TTL, TTL).unwrap().is_none());
    }

    #[test]
    fn payload_failures_are_not_retried() {
        let f = Fixture::new();
        let id = f.q.submit(&[spec("a")], 3).unwrap()[0];
        let c = claim(&f, "x", TTL);
        let r =
            f.q.complete("x", &report(&c, Outcome::Exited { code: 3 }, None));
        assert_eq!(r.unwrap(), Completion::Recorded(JobState::Failed));
        let v = f.q.job(id).unwrap().unwrap();
        assert_eq!(v.outcome.unwrap().exit_code, Some(3));
        assert_eq!(v.timings_ms, Some([1, 2, 3]));
        let sandbox = v.sandbox.as_ref().expect("the sandbox report is kept");
        assert_eq!(sandbox.missing, [Protection::Uid].into());
        assert_eq!(v.files.len(), 1);
    }

    #[test]
    fn limit_exceeded_is_a_final_failure_that_names_the_limit() {
        let f = Fixture::new();
        let id = f.q.submit(&[spec("a")], 3).unwrap()[0];
        let c = claim(&f, "x", TTL);
        let hit = Outcome::LimitExceeded {
            limit: copilot_protocol::wire::Limit::Cpu,
        };
        let r = f.q.complete("x", &report(&c, hit, None));
        assert_eq!(r.unwrap(), Completion::Recorded(JobState::Failed));
        let o = f.q.job(id).unwrap().unwrap().outcome.unwrap();
        assert_eq!(o.kind, "limit-exceeded");
        assert_eq!(o.limit.as_deref(), Some("cpu"));
        assert_eq!((o.exit_code, o.signal), (None, None));
        assert!(
            f.q.claim("x", None, TTL, TTL).unwrap().is_none(),
            "not retried"
        );
    }

    #[test]
    fn stale_reports_of_old_attempts_are_refused() {
        let f = Fixture::new();
        let id = f.q.submit(&[spec("a")], 3).unwrap()[0];
        let old = claim(&f, "a", 5 * MS);
        f.advance(6);
        f.q.expire_leases().unwrap();
        let new = claim(&f, "b", TTL);
        assert!(matches!(
            f.q.complete("a", &report(&old, OK, None)),
            Err(QueueError::StaleLease { attempt: 1, .. })
        ));
        // The new holder's report of the old attempt number is stale too.
        assert!(f.q.complete("b", &report(&old, OK, None)).is_err());
        assert_eq!(f.state(id), JobState::Assigned);
        assert_eq!(
            f.q.complete("b", &report(&new, OK, None)).unwrap(),
            Completion::Recorded(JobState::Done)
        );
        assert!(matches!(
            f.q.complete("a", &report(&old, OK, None)),
            Err(QueueError::StaleLease { .. })
        ));
        assert_eq!(f.count("SELECT COUNT(*) FROM reports"), 1);
    }

    #[test]
    fn retransmitted_reports_are_recorded_once() {
        let f = Fixture::new();
        let id = f.q.submit(&[spec("a")], 3).unwrap()[0];
        let c = claim(&f, "a", TTL);
        let r = report(&c, OK, None);
        assert_eq!(
            f.q.complete("a", &r).unwrap(),
            Completion::Recorded(JobState::Done)
        );
        let updated = f.q.job(id).unwrap().unwrap().updated_ms;
        f.advance(100);
        assert_eq!(f.q.complete("a", &r).unwrap(), Completion::Duplicate);
        assert!(matches!(
            f.q.complete("intruder", &r),
            Err(QueueError::StaleLease { .. })
        ));
        assert_eq!(f.q.job(id).unwrap().unwrap().updated_ms, updated);
        assert_eq!(f.count("SELECT COUNT(*) FROM reports"), 1);
        assert_eq!(
            f.count("SELECT COUNT(*) FROM events WHERE to_state = 'done'"),
            1
        );
        // Also for a retryable failure that requeued the job.
        let id2 = f.q.submit(&[spec("b")], 3).unwrap()[0];
        let c2 = claim(&f, "a", TTL);
        let r2 = report(&c2, Outcome::SetupFailed("no sh".into()), None);
        assert_eq!(
            f.q.complete("a", &r2).unwrap(),
            Completion::Recorded(JobState::Queued)
        );
        assert_eq!(f.q.complete("a", &r2).unwrap(), Completion::Duplicate);
        assert_eq!(f.state(id2), JobState::Queued);
    }

    #[test]
    fn done_jobs_are_credited_to_their_volunteer_once() {
        let f = Fixture::new();
        f.q.submit(&[spec("a"), spec("b"), spec("c")], 3).unwrap();
        let v = Volunteer {
            user_id: 42,
            host_id: 7,
            team_id: 3,
            host_token: Some("ab".repeat(32)),
        };
        let with = |c: &Claim, outcome: Outcome, cpu_ms: u64| DoneReport {
            volunteer: Some(v.clone()),
            timings: Timings {
                cpu_ms: Some(cpu_ms),
                ..Timings::default()
            },
            ..report(c, outcome, None)
        };
        let c1 = claim(&f, "a", TTL);
        let r1 = with(&c1, OK, 1500);
        f.q.complete("a", &r1).unwrap();
        assert_eq!(f.q.complete("a", &r1).unwrap(), Completion::Duplicate);
        // A failed job earns nothing.
        let c2 = claim(&f, "a", TTL);
        f.q.complete("a", &with(&c2, Outcome::Exited { code: 1 }, 9000))
            .unwrap();
        let c3 = claim(&f, "a", TTL);
        let r3 = DoneReport {
            volunteer: Some(Volunteer {
                host_token: None,
                ..v.clone()
            }),
            ..with(&c3, OK, 250)
        };
        f.q.complete("a", &r3).unwrap();
        let list = f.q.volunteers().unwrap().volunteers;
        assert_eq!(list.len(), 1, "{list:?}");
        let c = &list[0];
        assert_eq!((c.user_id, c.host_id, c.team_id), (42, 7, 3));
        assert_eq!(c.jobs_done, 2);
        assert!((c.cpu_seconds - 1.75).abs() < 1e-9, "{c:?}");
        assert_eq!(
            c.host_token, v.host_token,
            "a report without a token keeps the last"
        );
        // Reports without a volunteer credit nobody.
        f.q.submit(&[spec("d")], 3).unwrap();
        let c4 = claim(&f, "a", TTL);
        f.q.complete("a", &report(&c4, OK, None)).unwrap();
        assert_eq!(f.q.volunteers().unwrap().volunteers[0].jobs_done, 2);
    }

    #[test]
    fn a_version_1_database_gains_the_credit_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO jobs (name, spec, state, max_retries, created, updated)
                 VALUES ('old', ?1, 'queued', 3, 1, 1)",
                [to_json(&spec("old")).unwrap()],
            )
            .unwrap();
        }
        let q = Queue::open(&path).unwrap();
        assert_eq!(q.list(None).unwrap().jobs.len(), 1, "jobs survive");
        assert!(q.volunteers().unwrap().volunteers.is_empty());
        let version: i64 = q
            .lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn success_needs_the_stored_archive() {
        let f = Fixture::new();
        let mut s = spec("a");
        s.outputs = vec!["out.txt".into()];
        let id = f.q.submit(&[s], 3).unwrap()[0];
        let stored = Stored {
            sha256: Sha256::of(b"archive"),
            size: 7,
        };
        let other = Stored {
            sha256: Sha256::of(b"other"),
            size: 5,
        };
        // No archive at all although outputs are declared.
        let c = claim(&f, "a", TTL);
        let r = f.q.complete("a", &report(&c, OK, None)).unwrap();
        assert_eq!(r, Completion::Recorded(JobState::Queued));
        // An archive that differs from the stored one.
        let c = claim(&f, "a", TTL);
        f.q.authorize_upload(id, c.attempt, &c.upload_token)
            .unwrap();
        f.q.record_archive(id, c.attempt, stored).unwrap();
        let r = f.q.complete("a", &report(&c, OK, Some(other))).unwrap();
        assert_eq!(r, Completion::Recorded(JobState::Queued));
        let v = f.q.job(id).unwrap().unwrap();
        assert_eq!(v.outcome.unwrap().kind, "stage-out-failed");
        assert!(v.note.unwrap().contains("differs"));
        // The next attempt starts without the old archive; a matching one succeeds.
        let c = claim(&f, "a", TTL);
        assert_eq!(f.q.archive_of(id).unwrap(), None);
        let r = f.q.complete("a", &report(&c, OK, Some(stored))).unwrap();
        assert_eq!(
            r,
            Completion::Recorded(JobState::Queued),
            "reported but never stored"
        );
        let c = claim(&f, "a", TTL);
        f.q.authorize_upload(id, c.attempt, &c.upload_token)
            .unwrap();
        f.q.record_archive(id, c.attempt, stored).unwrap();
        let r = f.q.complete("a", &report(&c, OK, Some(stored))).unwrap();
        assert_eq!(r, Completion::Recorded(JobState::Done));
        let v = f.q.job(id).unwrap().unwrap();
        assert_eq!((v.archive, v.attempt, v.note), (Some(stored), 4, None));
        assert_eq!(f.q.archive_of(id).unwrap(), Some((4, stored)));
    }

    #[test]
    fn upload_tokens_are_checked() {
        let f = Fixture::new();
        let sha = Sha256::of(b"input");
        let mut s = spec("a");
        s.inputs = vec![JobInput {
            name: "in".into(),
            source: InputSource::Stored {
                sha256: sha,
                size: 5,
            },
        }];
        let id = f.q.submit(&[s], 3).unwrap()[0];
        assert!(!f.q.token_may_read_input("nothing", &sha).unwrap());
        let c = f.q.claim("a", None, TTL, 100 * MS).unwrap().unwrap();
        let t = &c.upload_token;
        assert!(f.q.token_may_read_input(t, &sha).unwrap());
        assert!(!f.q.token_may_read_input(t, &Sha256::of(b"other")).unwrap());
        let bad = "0".repeat(64);
        for (attempt, token) in [(1, bad.as_str()), (2, t.as_str())] {
            assert!(matches!(
                f.q.authorize_upload(id, attempt, token),
                Err(QueueError::TokenInvalid)
            ));
        }
        assert!(matches!(
            f.q.authorize_upload(77, 1, t),
            Err(QueueError::UnknownJob(77))
        ));
        assert_eq!(f.state(id), JobState::Assigned);
        f.q.authorize_upload(id, 1, t).unwrap();
        assert_eq!(f.state(id), JobState::Uploading);
        f.advance(100);
        assert!(matches!(
            f.q.authorize_upload(id, 1, t),
            Err(QueueError::TokenInvalid)
        ));
        assert!(!f.q.token_may_read_input(t, &sha).unwrap());
    }

    #[test]
    fn tokens_die_with_the_lease() {
        let f = Fixture::new();
        let id = f.q.submit(&[spec("a")], 3).unwrap()[0];
        let c = claim(&f, "a", TTL);
        f.q.release_agent("a", "gone").unwrap();
        assert!(matches!(
            f.q.authorize_upload(id, 1, &c.upload_token),
            Err(QueueError::TokenInvalid)
        ));
        let stored = Stored {
            sha256: Sha256::of(b""),
            size: 0,
        };
        assert!(matches!(
            f.q.record_archive(id, 1, stored),
            Err(QueueError::StaleLease { .. })
        ));
    }

    #[test]
    fn list_filters_and_counts() {
        let f = Fixture::new();
        let ids = f.q.submit(&[spec("a"), spec("b")], 3).unwrap();
        claim(&f, "a", TTL);
        let all = f.q.list(None).unwrap();
        assert_eq!(all.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), ids);
        assert_eq!(all.counts[&JobState::Queued], 1);
        assert_eq!(all.counts[&JobState::Assigned], 1);
        assert_eq!(all.counts[&JobState::Done], 0);
        let queued = f.q.list(Some(JobState::Queued)).unwrap();
        assert_eq!(queued.jobs.len(), 1);
        assert_eq!(queued.jobs[0].id, ids[1]);
        assert_eq!(f.q.job(999).unwrap(), None);
    }

    #[test]
    fn reads_for_people_group_batches_failures_and_hosts() {
        let f = Fixture::new();
        let names = ["mc#0", "mc#1", "mc#12", "mc#x", "mc", "mcx#1", "other"];
        let specs: Vec<JobSpec> = names.iter().map(|n| spec(n)).collect();
        let ids = f.q.submit(&specs, 0).unwrap();
        let batch: Vec<JobId> = f.q.batch_jobs("mc").unwrap().iter().map(|j| j.id).collect();
        assert_eq!(
            batch,
            [ids[0], ids[1], ids[2], ids[4]],
            "mc#x and mcx#1 are not in mc"
        );
        assert_eq!(f.q.batch_jobs("mc#x").unwrap().len(), 1);
        assert!(f.q.batch_jobs("m").unwrap().is_empty());
        // Four jobs end: done on a, exit 3 on b, a lease lost with no retry left, a host failure.
        let c = claim(&f, "a", TTL);
        f.q.complete("a", &report(&c, OK, None)).unwrap();
        let c = claim(&f, "b", TTL);
        f.q.complete("b", &report(&c, Outcome::Exited { code: 3 }, None))
            .unwrap();
        claim(&f, "b", 5 * MS);
        f.advance(6);
        f.q.expire_leases().unwrap();
        let c = claim(&f, "a", TTL);
        f.q.complete("a", &report(&c, Outcome::SetupFailed("no sh".into()), None))
            .unwrap();
        let batches = f.q.batches().unwrap();
        let by_name: BTreeMap<&str, &BatchSummary> =
            batches.iter().map(|b| (b.name.as_str(), b)).collect();
        assert_eq!(batches[0].name, "other", "newest first");
        let mc = by_name["mc"];
        assert_eq!((mc.jobs, mc.first_id, mc.last_id), (4, ids[0], ids[4]));
        assert_eq!(mc.counts[&JobState::Done], 1);
        assert_eq!(mc.counts[&JobState::Failed], 2);
        assert_eq!(mc.counts[&JobState::Queued], 1);
        assert_eq!(by_name["mc#x"].counts[&JobState::Failed], 1);
        let causes = f.q.failure_causes().unwrap();
        let causes: Vec<(&str, u64)> = causes.iter().map(|c| (c.cause.as_str(), c.count)).collect();
        assert_eq!(
            causes,
            [
                ("exit 3", 1),
                ("retries used up (lease expired)", 1),
                ("retries used up (setup failed)", 1)
            ]
        );
        let hosts = f.q.host_contributions().unwrap();
        assert_eq!(hosts.len(), 2);
        let a = &hosts[0];
        assert_eq!(
            (
                a.agent.as_str(),
                a.jobs_done,
                a.jobs_failed,
                a.host_failures
            ),
            ("a", 1, 1, 0),
            "the host failure failed the job for good: no retries were left"
        );
        assert!((a.run_seconds - 0.002).abs() < 1e-9, "{a:?}");
        assert_eq!((hosts[1].agent.as_str(), hosts[1].jobs_failed), ("b", 1));
        // Events, all and one job's, by row id.
        let all = f.q.events_after(0, 1000).unwrap();
        assert_eq!(all.last().unwrap().id, f.q.last_event_id().unwrap());
        assert_eq!(f.q.events_after(all[2].id, 2).unwrap(), all[3..5]);
        let one = f.q.job_events(ids[0]).unwrap();
        let states: Vec<JobState> = one.iter().map(|e| e.to).collect();
        assert_eq!(
            states,
            [JobState::Queued, JobState::Assigned, JobState::Done]
        );
        assert!(f.q.job_events(999).unwrap().is_empty());
        // While the dispatching connection is busy in a write, people still read.
        let writer = f.q.lock();
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        let recent: Vec<JobId> = f.q.recent(2).unwrap().iter().map(|j| j.id).collect();
        assert_eq!(recent, [ids[6], ids[5]]);
        writer.execute_batch("ROLLBACK").unwrap();
    }

    #[test]
    fn causes_come_from_the_logged_reasons() {
        assert_eq!(
            lost_cause("lease expired, no progress from a"),
            "lease expired"
        );
        assert_eq!(lost_cause("vm-1: agent went offline"), "agent went offline");
        assert_eq!(lost_cause("stage-in failed: 404"), "stage-in failed");
        assert_eq!(lost_cause("setup failed: no sh"), "setup failed");
        assert_eq!(lost_cause("stage-out failed: x"), "stage-out failed");
        assert_eq!(lost_cause("cosmic rays"), "other");
        let exit = OutcomeView {
            kind: "exited".into(),
            exit_code: Some(2),
            signal: None,
            limit: None,
            text: String::new(),
        };
        assert_eq!(failure_cause(Some(&exit), None), "exit 2");
        assert_eq!(
            failure_cause(
                Some(&exit),
                Some("attempt 4 lost (x: agent went offline); no retries left of 3")
            ),
            "retries used up (agent went offline)"
        );
        assert_eq!(failure_cause(None, Some("odd")), "unknown");
    }

    #[test]
    fn everything_survives_a_reopen() {
        let f = Fixture::new();
        let ids = f.q.submit(&[spec("a"), spec("b")], 2).unwrap();
        let c = claim(&f, "a", TTL);
        f.q.authorize_upload(c.job, 1, &c.upload_token).unwrap();
        let before = f.q.list(None).unwrap();
        let Fixture {
            _dir,
            path,
            time,
            q,
        } = f;
        drop(q);
        let q = open(&path, &time);
        let after = q.list(None).unwrap();
        assert_eq!(after.jobs, before.jobs);
        assert_eq!(after.counts, before.counts);
        q.authorize_upload(c.job, 1, &c.upload_token).unwrap();
        assert_eq!(
            q.complete("a", &report(&c, OK, None)).unwrap(),
            Completion::Recorded(JobState::Done)
        );
        let next = q.claim("a", None, TTL, TTL).unwrap().unwrap();
        assert_eq!(next.job, ids[1]);
        let events: u64 = q
            .lock()
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap();
        // 2 submitted, 2 assigned, 1 uploading, 1 done.
        assert_eq!(events, 6);
    }

    #[test]
    fn replicas_go_to_distinct_agents_and_a_quorum_of_equal_outputs_decides() {
        use copilot_protocol::job::Replication;
        let f = Fixture::new();
        let replicated = |replicas, quorum| {
            let mut s = spec("rep");
            s.replication = Some(Replication {
                replicas,
                quorum,
                validator: None,
            });
            s
        };
        let ids = f.q.submit(&[replicated(3, 2)], 3).unwrap();
        assert_eq!(ids.len(), 3, "one job per replica");
        let c1 = claim(&f, "a1", TTL);
        assert!(
            f.q.claim("a1", None, TTL, TTL).unwrap().is_none(),
            "a1 already holds a replica of the only group"
        );
        let c2 = claim(&f, "a2", TTL);
        let c3 = claim(&f, "a3", TTL);
        assert_eq!(vec![c1.job, c2.job, c3.job], ids);
        let replica = |id| f.q.job(id).unwrap().unwrap().replica.unwrap();
        assert!(ids.iter().all(|id| replica(*id).group == ids[0]));
        let done = |agent: &str, c: &Claim, output: &[u8]| {
            let mut r = report(c, OK, None);
            r.files[0].sha256 = Sha256::of(output);
            f.q.complete(agent, &r).unwrap();
        };
        done("a1", &c1, b"42");
        assert_eq!(replica(c1.job).validation, Validation::Pending);
        done("a3", &c3, b"41");
        assert_eq!(replica(c1.job).validation, Validation::Pending, "1 to 1");
        assert_eq!(replica(c3.job).validation, Validation::Pending);
        done("a2", &c2, b"42");
        assert_eq!(replica(c1.job).validation, Validation::Valid);
        assert_eq!(replica(c2.job).validation, Validation::Valid);
        assert_eq!(replica(c3.job).validation, Validation::Outvoted);

        // Quorum 2 of 4 lets two sets of results win: the one that won first stays the winner
        // when a late replica gives the other set a quorum too.
        let ids = f.q.submit(&[replicated(4, 2)], 3).unwrap();
        let c: Vec<Claim> = ["a1", "a2", "a3", "a4"]
            .into_iter()
            .map(|a| claim(&f, a, TTL))
            .collect();
        done("a2", &c[1], b"B");
        done("a3", &c[2], b"B");
        done("a4", &c[3], b"A");
        assert_eq!(replica(ids[1]).validation, Validation::Valid);
        done("a1", &c[0], b"A");
        assert_eq!(
            ids.iter()
                .map(|id| replica(*id).validation)
                .collect::<Vec<_>>(),
            [
                Validation::Outvoted,
                Validation::Valid,
                Validation::Valid,
                Validation::Outvoted
            ]
        );

        // Two replicas that disagree, quorum 2: no result once both ended.
        let ids = f.q.submit(&[replicated(2, 2)], 3).unwrap();
        let (c1, c2) = (claim(&f, "a1", TTL), claim(&f, "a2", TTL));
        done("a1", &c1, b"1");
        assert_eq!(replica(ids[0]).validation, Validation::Pending);
        done("a2", &c2, b"2");
        for id in ids {
            assert_eq!(replica(id).validation, Validation::NoQuorum);
        }
        // A replica whose agent vanished with no retries left ends its group's vote too.
        let ids = f.q.submit(&[replicated(2, 2)], 0).unwrap();
        let short = Duration::from_secs(1);
        let (c1, _c2) = (claim(&f, "a1", short), claim(&f, "a2", short));
        done("a1", &c1, b"1");
        assert_eq!(replica(ids[0]).validation, Validation::Pending);
        f.advance(2_000);
        f.q.expire_leases().unwrap();
        assert_eq!(f.state(ids[1]), JobState::Failed);
        for id in ids {
            assert_eq!(replica(id).validation, Validation::NoQuorum);
        }
        // Unreplicated jobs have no replica view.
        let id = f.q.submit(&[spec("single")], 3).unwrap()[0];
        assert_eq!(f.q.job(id).unwrap().unwrap().replica, None);
    }

    #[test]
    fn a_validators_verdicts_decide_between_replicas_with_different_outputs() {
        use copilot_protocol::job::Replication;
        let f = Fixture::new();
        let mut s = spec("close");
        s.replication = Some(Replication {
            replicas: 3,
            quorum: 2,
            validator: Some("close".into()),
        });
        let ids = f.q.submit(&[s], 3).unwrap();
        let claims: Vec<Claim> = ["a1", "a2", "a3"]
            .into_iter()
            .map(|a| claim(&f, a, TTL))
            .collect();
        let done = |n: usize, output: &[u8]| {
            let mut r = report(&claims[n], OK, None);
            r.files[0].sha256 = Sha256::of(output);
            f.q.complete(&format!("a{}", n + 1), &r).unwrap();
        };
        let validation = |id| f.q.job(id).unwrap().unwrap().replica.unwrap().validation;
        let due = || -> Vec<(JobId, JobId)> {
            let due = f.q.comparisons_due((0, 0), 10).unwrap();
            assert!(due
                .iter()
                .all(|c| c.group == ids[0] && c.validator == "close"));
            due.iter().map(|c| (c.a, c.b)).collect()
        };
        done(0, b"0.501");
        assert_eq!(due(), [], "one done replica: nothing to compare");
        done(1, b"0.502");
        assert_eq!(due(), [(ids[0], ids[1])]);
        assert_eq!(validation(ids[0]), Validation::Pending, "no verdict yet");
        // The same outputs as the first replica's: those two agree without asking.
        done(2, b"0.501");
        assert_eq!(due(), [(ids[0], ids[1]), (ids[1], ids[2])]);
        let page = f.q.comparisons_due((ids[0], ids[1]), 10).unwrap();
        assert_eq!(page.len(), 1, "the pairs after the first");
        assert_eq!((page[0].a, page[0].b), (ids[1], ids[2]));
        let verdict = |a, b, same| {
            let c = Comparison {
                group: ids[0],
                a,
                b,
                validator: "close".into(),
            };
            f.q.record_verdict(&c, same, "what the validator said")
                .unwrap();
        };
        verdict(ids[0], ids[1], false);
        assert_eq!(due(), [(ids[1], ids[2])]);
        assert_eq!(
            validation(ids[0]),
            Validation::Pending,
            "a pair not compared"
        );
        verdict(ids[1], ids[2], false);
        assert_eq!(due(), []);
        assert_eq!(
            ids.iter().map(|id| validation(*id)).collect::<Vec<_>>(),
            [Validation::Valid, Validation::Outvoted, Validation::Valid]
        );

        // Outputs the validator says agree make a quorum of their own.
        let mut s = spec("close");
        s.replication = Some(Replication {
            replicas: 2,
            quorum: 2,
            validator: Some("close".into()),
        });
        let ids = f.q.submit(&[s], 3).unwrap();
        for (n, agent) in ["b1", "b2"].into_iter().enumerate() {
            let c = claim(&f, agent, TTL);
            let mut r = report(&c, OK, None);
            r.files[0].sha256 = Sha256::of(&[n as u8]);
            f.q.complete(agent, &r).unwrap();
        }
        let due = f.q.comparisons_due((0, 0), 10).unwrap();
        assert_eq!(due.len(), 1);
        f.q.record_verdict(&due[0], true, "close enough").unwrap();
        assert!(ids.iter().all(|id| validation(*id) == Validation::Valid));
    }

    #[test]
    fn replicas_go_to_distinct_boinc_users_when_known() {
        use copilot_protocol::job::Replication;
        let f = Fixture::new();
        let mut s = spec("rep");
        s.replication = Some(Replication {
            replicas: 2,
            quorum: 2,
            validator: None,
        });
        let ids = f.q.submit(&[s], 3).unwrap();
        let by = |agent, user| f.q.claim(agent, user, TTL, TTL).unwrap();
        assert_eq!(by("a1", Some(7)).unwrap().job, ids[0]);
        assert!(
            by("a2", Some(7)).is_none(),
            "user 7 holds a replica already"
        );
        assert!(
            by("a3", Some(u64::MAX)).is_some(),
            "an impossible id is an unknown user, which any replica may go to"
        );
        // Once the replica of user 7 is lost and requeued, another user may take it.
        let ids = f.q.submit(&[spec("single")], 3).unwrap();
        assert_eq!(
            by("a2", Some(7)).unwrap().job,
            ids[0],
            "unreplicated: anyone"
        );
        f.q.release_agent("a1", "gone").unwrap();
        assert!(
            by("a4", Some(7)).is_some(),
            "a1's replica is free again, user 7 included"
        );
    }
}
