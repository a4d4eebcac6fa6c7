//! The etag table in Redis (or Valkey), shared by every replica of the gateway.
//!
//! Every step of the contract is one Lua script, run atomically by the server in one round trip: no
//! read-then-write from the gateway, no `WATCH`. A resource's keys share one hash tag (`eg:{path}` and
//! `eg:{path}:l`), so they sit in one slot.
//!
//! - Entry hash `eg:{path}`: `e` current etag ("" = none), `v` version, `n` writes in flight, `be`/`lm`
//!   the backend's validator, `ep` the store epoch. Every touch renews its TTL (`store.idle_ttl_seconds`);
//!   an expired entry is unknown, which matches no `If-Match`.
//! - Lease set `eg:{path}:l`: one member per reservation (its version), scored by its deadline. A
//!   replica that dies mid-write leaves a lease that expires; the next step on the entry reaps it as an
//!   **unknown outcome** (no etag anyone holds), never as "free".
//! - Versions follow the server clock (µs), so an entry created again after expiry never repeats an old
//!   version a read ticket might hold.
//! - Epochs: `eg:identity` keeps the server's identity (`run_id` and replication id) and the epoch.
//!   Each script first checks the server's identity against the one the gateway knows; a new identity
//!   (restart, restore from an old snapshot, failover, resynchronisation from a lagging server) makes
//!   the gateway adopt a new, larger epoch. Entries of another epoch are
//!   discarded on sight, and etags carry their epoch, so no older etag can become current again.
//!   (The identity is one server's: Redis Cluster would need one per shard, which is not done.)
//! - Failing closed: when Redis cannot answer, the store returns an error; the proxy refuses writes
//!   (503) and serves reads without an etag. The error is logged once per outage.

use super::{EtagStore, StoreError};
use crate::etag::Etag;
use crate::precondition::{IfMatch, IfNoneMatch, Preconditions, TagSet};
use crate::resource_key::ResourceKey;
use crate::table::{
    plan_read, BackendValidator, EntryState, ReadAnswer, ReadStart, ReadTicket, Refusal,
    Reservation, WriteOutcome, WriteTicket,
};
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisError, Script, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Shared by every per-resource script: identity check, clock-following versions, load (with epoch
/// check and lease reaping) and save.
const PRELUDE: &str = r#"
local key, leases = KEYS[1], KEYS[2]
local rid, epoch, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- (identity() is inserted here)
if identity() ~= rid then
  return redis.error_reply('EGIDENTITY the store has a new identity')
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function next_version(v)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if v and v >= now then return v + 1 end
  return now
end
local function vstr(v) return string.format('%.0f', v) end
-- An idle entry lives for the idle TTL; one with writes in flight at least a minute past its last
-- lease, so that it can never expire (and be taken for unknown-and-free) under a reservation.
local function keep_alive(ent)
  local keep = ttl
  if ent.n > 0 then
    local last = redis.call('ZRANGE', leases, -1, -1, 'WITHSCORES')
    if last[2] then keep = math.max(ttl, tonumber(last[2]) - now_ms() + 60000) end
    redis.call('PEXPIRE', leases, keep)
  end
  redis.call('PEXPIRE', key, keep)
end
local function save(ent)
  redis.call('HSET', key, 'e', ent.e, 'v', vstr(ent.v), 'n', ent.n, 'be', ent.be, 'lm', ent.lm, 'ep', epoch)
  keep_alive(ent)
end
local function new_entry() return {e = '', v = next_version(nil), n = 0, be = '', lm = ''} end
local function load()
  local h = redis.call('HMGET', key, 'e', 'v', 'n', 'be', 'lm', 'ep')
  if not h[2] then return nil end
  if h[6] ~= epoch then
    redis.call('DEL', key, leases)
    return nil
  end
  local ent = {e = h[1], v = tonumber(h[2]), n = tonumber(h[3]), be = h[4], lm = h[5]}
  if ent.n > 0 then
    local now = now_ms()
    local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
    if #expired > 0 then
      -- a reservation whose lease ran out: its outcome is unknown
      redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
      ent.n = math.max(ent.n - #expired, 0)
      ent.e, ent.be, ent.lm = '', '', ''
      ent.v = next_version(ent.v)
      save(ent)
    end
  end
  return ent
end
local function forget(ent)
  ent.e, ent.be, ent.lm = '', '', ''
  ent.v = next_version(ent.v)
end
"#;

const BEGIN_READ: &str = r#"
local ent = load()
if not ent then
  ent = new_entry()
  save(ent)
else
  keep_alive(ent)
end
return {vstr(ent.v), ent.e, ent.n, ent.be, ent.lm}
"#;

const VIEW: &str = r#"
local ent = load()
if not ent then return {'', 1, '', '', 0} end
return {ent.e, ent.n, ent.be, ent.lm, 1}
"#;

// ARGV[4] ticket version, [5] answer F(ound)/G(one)/X, [6] backend etag, [7] last-modified, [8] fresh etag
const FINISH_READ: &str = r#"
local ent = load()
if not ent then return false end
if vstr(ent.v) ~= ARGV[4] or ent.n ~= 0 then return false end
local answer = ARGV[5]
if answer ~= 'F' then
  if ent.e == '' then
    redis.call('DEL', key, leases)
  elseif answer == 'G' then
    forget(ent)
    save(ent)
  end
  return false
end
local be, lm = ARGV[6], ARGV[7]
local seen = be ~= '' or lm ~= ''
if seen and (ent.be ~= '' or ent.lm ~= '') and (ent.be ~= be or ent.lm ~= lm) then
  -- changed behind the gateway: rotate before handing out
  ent.e = ARGV[8]
  ent.v = next_version(ent.v)
end
if seen then ent.be, ent.lm = be, lm end
if ent.e == '' then ent.e = ARGV[8] end
save(ent)
return ent.e
"#;

// ARGV[4] lease ms, [5] If-Match mode ''/'*'/'L', [6] its strong tags, [7] If-Unmodified-Since (unix s),
// [8] If-None-Match mode, [9] its tags. Lists are newline-separated.
const RESERVE: &str = r#"
local function contains(list, value)
  if value == '' then return false end
  for item in string.gmatch(list, '[^\n]+') do
    if item == value then return true end
  end
  return false
end
local ent = load()
local cur = ent and ent.e or ''
local settled = (not ent) or ent.n == 0
local refuse = {'R', cur}
local named = false
if ARGV[5] ~= '' then
  if not (settled and cur ~= '' and (ARGV[5] == '*' or contains(ARGV[6], cur))) then return refuse end
  named = true
elseif ARGV[7] ~= '' and ent and ent.lm ~= '' then
  if (not settled) or cur == '' or tonumber(ent.lm) > tonumber(ARGV[7]) then return refuse end
  named = true
end
local probe = 0
if ARGV[8] ~= '' then
  if not settled then return refuse end
  if cur ~= '' and (ARGV[8] == '*' or contains(ARGV[9], cur)) then return refuse end
  if ARGV[8] == '*' then probe = 1 end
end
if not ent then ent = new_entry() end
local be, lm = '', ''
if named then be, lm = ent.be, ent.lm end
local before = ent.e
ent.e = ''
ent.v = next_version(ent.v)
ent.n = ent.n + 1
redis.call('ZADD', leases, now_ms() + tonumber(ARGV[4]), vstr(ent.v))
save(ent)
return {'OK', vstr(ent.v), before, probe, be, lm}
"#;

// ARGV[4] ticket version, [5] outcome A/U/N/X/C, [6] new etag, [7] backend etag, [8] last-modified,
// [9] etag before
const SETTLE: &str = r#"
local ent = load()
if not ent then return false end
if redis.call('ZREM', leases, ARGV[4]) == 0 then
  -- the lease ran out first and was settled as unknown
  return false
end
ent.n = ent.n - 1
local alone = vstr(ent.v) == ARGV[4]
local outcome = ARGV[5]
local handed = false
if outcome == 'A' and alone then
  ent.e, ent.be, ent.lm = ARGV[6], ARGV[7], ARGV[8]
  handed = ARGV[6]
elseif outcome == 'N' then
  if alone then ent.e = ARGV[9] end
else
  ent.e, ent.be, ent.lm = '', '', ''
end
ent.v = next_version(ent.v)
save(ent)
return handed
"#;

const FORGET: &str = r#"
local ent = load()
if not ent then return false end
forget(ent)
save(ent)
return true
"#;

// ARGV[4] etag, [5] backend etag, [6] last-modified
const REGISTER_CREATED: &str = r#"
local ent = load()
if ent and ent.n > 0 then return false end
if not ent then ent = new_entry() end
ent.e, ent.be, ent.lm = ARGV[4], ARGV[5], ARGV[6]
ent.v = next_version(ent.v)
save(ent)
return ARGV[4]
"#;

// ARGV[4] etag
const WITHDRAW: &str = r#"
local ent = load()
if ent and ent.e == ARGV[4] then
  forget(ent)
  save(ent)
end
return false
"#;

/// Adopts the server's identity: the same `run_id` keeps its epoch; a new one gets a new epoch, larger
/// than any before (the server clock in ms, or the old epoch + 1).
const IDENTITY: &str = r#"
local rid = identity()
local policy = string.match(redis.call('INFO', 'memory'), 'maxmemory_policy:([%w-]+)') or ''
local h = redis.call('HMGET', KEYS[1], 'rid', 'epoch')
if h[1] == rid and h[2] then return {rid, h[2], policy} end
local t = redis.call('TIME')
local ep = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if h[2] and tonumber(h[2]) >= ep then ep = tonumber(h[2]) + 1 end
local eps = string.format('%.0f', ep)
redis.call('HSET', KEYS[1], 'rid', rid, 'epoch', eps)
return {rid, eps, policy}
"#;

/// The server's identity: its `run_id` (new at every start) and its replication id (new when it is
/// promoted or resynchronised from another server, whose data may lag).
const IDENTITY_FN: &str = r#"
local function identity()
  local server = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
  local replication = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
  return server .. ':' .. replication
end
"#;

const IDENTITY_KEY: &str = "eg:identity";
/// The Redis password, when it is not in `store.url`.
pub const PASSWORD_ENV: &str = "ETAG_GATEWAY_REDIS_PASSWORD";

struct Scripts {
    begin_read: Script,
    view: Script,
    finish_read: Script,
    reserve: Script,
    settle: Script,
    forget: Script,
    register_created: Script,
    withdraw: Script,
    identity: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let prelude = PRELUDE.replace("-- (identity() is inserted here)", IDENTITY_FN);
        let with_prelude = |body: &str| Script::new(&format!("{prelude}{body}"));
        Scripts {
            begin_read: with_prelude(BEGIN_READ),
            view: with_prelude(VIEW),
            finish_read: with_prelude(FINISH_READ),
            reserve: with_prelude(RESERVE),
            settle: with_prelude(SETTLE),
            forget: with_prelude(FORGET),
            register_created: with_prelude(REGISTER_CREATED),
            withdraw: with_prelude(WITHDRAW),
            identity: Script::new(&format!("{IDENTITY_FN}{IDENTITY}")),
        }
    }
}

/// The server identity the gateway works under.
#[derive(Clone, Debug)]
struct Identity {
    run_id: String,
    epoch: u64,
}

pub struct RedisStore {
    client: redis::Client,
    /// Created on first use, inside the runtime that will drive it; reconnects by itself.
    connection: OnceLock<ConnectionManager>,
    identity: RwLock<Option<Identity>>,
    scripts: Scripts,
    idle_ttl: Duration,
    lease: Duration,
    /// For logging an outage once, not per request.
    reachable: AtomicBool,
}

/// Redis timeouts: an answer slower than this fails the request closed (503), it is not awaited.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisStore {
    /// `lease`: how long a reservation may last before it counts as an unknown outcome; must exceed
    /// the longest a forwarded write can take (connect + read timeout + timeout hold).
    pub fn new(url: &str, idle_ttl: Duration, lease: Duration) -> Result<RedisStore, StoreError> {
        use redis::IntoConnectionInfo;
        let mut info = url
            .into_connection_info()
            .map_err(|e| StoreError(e.to_string()))?;
        // Credentials may stay out of the config file.
        if let Ok(password) = std::env::var(PASSWORD_ENV) {
            if info.redis_settings().password().is_none() {
                let settings = info.redis_settings().clone().set_password(password);
                info = info.set_redis_settings(settings);
            }
        }
        let client = redis::Client::open(info).map_err(|e| StoreError(e.to_string()))?;
        Ok(RedisStore {
            client,
            connection: OnceLock::new(),
            identity: RwLock::new(None),
            scripts: Scripts::new(),
            idle_ttl,
            lease,
            reachable: AtomicBool::new(true),
        })
    }

    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        if let Some(c) = self.connection.get() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| StoreError(e.to_string()))?;
        Ok(self.connection.get_or_init(|| manager).clone())
    }

    fn cached_identity(&self) -> Option<Identity> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn fetch_identity(&self) -> Result<Identity, RedisError> {
        let mut connection = self
            .connection()
            .map_err(|e| RedisError::from((redis::ErrorKind::Client, "no connection", e.0)))?;
        let (run_id, epoch, policy): (String, String, String) = self
            .scripts
            .identity
            .key(IDENTITY_KEY)
            .invoke_async(&mut connection)
            .await?;
        let identity = Identity {
            run_id,
            epoch: epoch.parse().unwrap_or(0),
        };
        let mut cached = self.identity.write().unwrap_or_else(|p| p.into_inner());
        if cached.as_ref().map(|c| c.epoch) != Some(identity.epoch) {
            tracing::info!(identity = %identity.run_id, epoch = identity.epoch, "redis store identity adopted");
            if policy != "noeviction" {
                tracing::warn!(
                    maxmemory_policy = %policy,
                    "Redis may evict keys under memory pressure, including a resource with a write in \
                     flight: set maxmemory-policy noeviction (entries expire by their TTL)"
                );
            }
        }
        *cached = Some(identity.clone());
        Ok(identity)
    }

    /// Runs one per-resource script. `args` gets the identity (for the epoch of fresh etags) and
    /// returns the script's arguments after the common ones. A new server identity is adopted and
    /// the step retried once.
    async fn run<T: FromRedisValue>(
        &self,
        script: &Script,
        key: &ResourceKey,
        args: impl Fn(&Identity) -> Vec<String>,
    ) -> Result<T, StoreError> {
        let result = self.try_run(script, key, &args).await;
        let result = match result {
            Err(e) if e.code() == Some("EGIDENTITY") => {
                *self.identity.write().unwrap_or_else(|p| p.into_inner()) = None;
                self.try_run(script, key, &args).await
            }
            other => other,
        };
        match result {
            Ok(value) => {
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!("redis store reachable again");
                }
                Ok(value)
            }
            Err(e) => {
                if self.reachable.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "redis store unavailable: writes are refused (503) until it answers");
                }
                Err(StoreError(e.to_string()))
            }
        }
    }

    async fn try_run<T: FromRedisValue>(
        &self,
        script: &Script,
        key: &ResourceKey,
        args: &impl Fn(&Identity) -> Vec<String>,
    ) -> Result<T, RedisError> {
        let identity = match self.cached_identity() {
            Some(identity) => identity,
            None => self.fetch_identity().await?,
        };
        let mut connection = self
            .connection()
            .map_err(|e| RedisError::from((redis::ErrorKind::Client, "no connection", e.0)))?;
        let entry_key = format!("eg:{{{key}}}");
        let mut invocation = script.key(&entry_key);
        invocation
            .key(format!("{entry_key}:l"))
            .arg(&identity.run_id)
            .arg(identity.epoch.to_string())
            .arg(self.idle_ttl.as_millis().to_string());
        for arg in args(&identity) {
            invocation.arg(arg);
        }
        invocation.invoke_async(&mut connection).await
    }

    fn fresh(identity: &Identity) -> String {
        Etag::fresh_in(identity.epoch).to_string()
    }
}

fn validator_args(v: &BackendValidator) -> [String; 2] {
    [
        v.etag.clone().unwrap_or_default(),
        v.last_modified
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs().to_string())
            .unwrap_or_default(),
    ]
}

fn validator_from(etag: String, last_modified: String) -> BackendValidator {
    BackendValidator {
        etag: (!etag.is_empty()).then_some(etag),
        last_modified: last_modified
            .parse::<u64>()
            .ok()
            .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
    }
}

fn etag_from(value: &str) -> Option<Etag> {
    Etag::parse(value)
}

/// A tag-set precondition as the scripts take it: mode (`""`, `"*"`, `"L"`) and newline-separated
/// opaque values (`strong_only`: weak tags never match `If-Match`, so they are left out).
fn tag_args(tags: Option<&TagSet>, strong_only: bool) -> [String; 2] {
    match tags {
        None => [String::new(), String::new()],
        Some(TagSet::Any) => ["*".into(), String::new()],
        Some(TagSet::Tags(tags)) => [
            "L".into(),
            tags.iter()
                .filter(|t| !(strong_only && t.weak))
                .map(|t| t.opaque.replace('\n', ""))
                .collect::<Vec<_>>()
                .join("\n"),
        ],
    }
}

fn unix_seconds(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_else(|_| "0".into())
}

#[async_trait]
impl EtagStore for RedisStore {
    async fn begin_read(
        &self,
        key: &ResourceKey,
        if_none_match: Option<&IfNoneMatch>,
    ) -> Result<ReadStart, StoreError> {
        let (version, etag, in_flight, be, lm): (String, String, u32, String, String) =
            self.run(&self.scripts.begin_read, key, |_| vec![]).await?;
        let ticket = ReadTicket {
            key: key.clone(),
            version: version.parse().unwrap_or(0),
        };
        Ok(plan_read(
            ticket,
            etag_from(&etag),
            in_flight == 0,
            &validator_from(be, lm),
            if_none_match,
        ))
    }

    async fn finish_read(
        &self,
        ticket: &ReadTicket,
        answer: ReadAnswer,
    ) -> Result<Option<Etag>, StoreError> {
        let (code, [be, lm]) = match &answer {
            ReadAnswer::Found(v) => ("F", validator_args(v)),
            ReadAnswer::Gone => ("G", Default::default()),
            ReadAnswer::Failed => ("X", Default::default()),
        };
        let etag: Option<String> = self
            .run(&self.scripts.finish_read, &ticket.key, |identity| {
                vec![
                    ticket.version.to_string(),
                    code.into(),
                    be.clone(),
                    lm.clone(),
                    Self::fresh(identity),
                ]
            })
            .await?;
        Ok(etag.as_deref().and_then(etag_from))
    }

    async fn check(
        &self,
        key: &ResourceKey,
        precondition: &IfMatch,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let (etag, in_flight): (String, u32) =
            self.run(&self.scripts.view, key, |_| vec![]).await?;
        let current = etag_from(&etag);
        Ok(
            if in_flight == 0 && precondition.is_satisfied_by(current.as_ref()) {
                Ok(())
            } else {
                Err(Refusal { current })
            },
        )
    }

    async fn reserve_write(
        &self,
        key: &ResourceKey,
        pre: &Preconditions,
    ) -> Result<Result<Reservation, Refusal>, StoreError> {
        let [im_mode, im_tags] = tag_args(pre.if_match.as_ref(), true);
        let [inm_mode, inm_tags] = tag_args(pre.if_none_match.as_ref(), false);
        let since = pre
            .if_unmodified_since
            .map(unix_seconds)
            .unwrap_or_default();
        let reply: Vec<Value> = self
            .run(&self.scripts.reserve, key, |_| {
                vec![
                    self.lease.as_millis().to_string(),
                    im_mode.clone(),
                    im_tags.clone(),
                    since.clone(),
                    inm_mode.clone(),
                    inm_tags.clone(),
                ]
            })
            .await?;
        let text = |i: usize| -> String {
            reply
                .get(i)
                .and_then(|v| String::from_redis_value(v.clone()).ok())
                .unwrap_or_default()
        };
        if text(0) != "OK" {
            return Ok(Err(Refusal {
                current: etag_from(&text(1)),
            }));
        }
        let backend = validator_from(text(4), text(5));
        Ok(Ok(Reservation {
            ticket: WriteTicket {
                key: key.clone(),
                version: text(1).parse().unwrap_or(0),
                etag_before: etag_from(&text(2)),
            },
            probe_existence: text(3) == "1",
            backend_precondition: (!backend.is_empty()).then_some(backend),
        }))
    }

    async fn settle_write(
        &self,
        ticket: WriteTicket,
        outcome: WriteOutcome,
        validator: BackendValidator,
    ) -> Result<Option<Etag>, StoreError> {
        let (code, new_etag) = match outcome {
            WriteOutcome::Applied(e) => ("A", Some(e)),
            WriteOutcome::AppliedUnnamed => ("U", None),
            WriteOutcome::NotApplied => ("N", None),
            WriteOutcome::Unknown => ("X", None),
            WriteOutcome::ChangedBehind => ("C", None),
        };
        let [be, lm] = validator_args(&validator);
        let before = ticket
            .etag_before
            .map(|e| e.to_string())
            .unwrap_or_default();
        let handed: Option<String> = self
            .run(&self.scripts.settle, &ticket.key, |identity| {
                // The new etag belongs to the epoch the step runs in.
                let new = new_etag.map(|_| Self::fresh(identity)).unwrap_or_default();
                vec![
                    ticket.version.to_string(),
                    code.into(),
                    new,
                    be.clone(),
                    lm.clone(),
                    before.clone(),
                ]
            })
            .await?;
        if !matches!(
            outcome,
            WriteOutcome::NotApplied | WriteOutcome::ChangedBehind
        ) {
            // Every listing that contains the resource changed (one step per ancestor: each is a
            // resource of its own, in its own hash slot).
            let mut next = ticket.key.parent();
            while let Some(key) = next {
                let _: bool = self.run(&self.scripts.forget, &key, |_| vec![]).await?;
                next = key.parent();
            }
        }
        Ok(handed.as_deref().and_then(etag_from))
    }

    async fn register_created(
        &self,
        key: &ResourceKey,
        validator: BackendValidator,
    ) -> Result<Option<Etag>, StoreError> {
        let [be, lm] = validator_args(&validator);
        let etag: Option<String> = self
            .run(&self.scripts.register_created, key, |identity| {
                vec![Self::fresh(identity), be.clone(), lm.clone()]
            })
            .await?;
        Ok(etag.as_deref().and_then(etag_from))
    }

    async fn withdraw(&self, key: &ResourceKey, etag: Etag) -> Result<(), StoreError> {
        let _: Option<String> = self
            .run(&self.scripts.withdraw, key, |_| vec![etag.to_string()])
            .await?;
        Ok(())
    }

    async fn describe(&self, key: &ResourceKey) -> Result<Option<EntryState>, StoreError> {
        let (etag, in_flight, be, lm, known): (String, u32, String, String, u32) =
            self.run(&self.scripts.view, key, |_| vec![]).await?;
        Ok((known == 1).then(|| EntryState {
            etag: etag_from(&etag),
            writes_in_flight: in_flight,
            backend: validator_from(be, lm),
        }))
    }

    async fn invalidate(&self, key: &ResourceKey) -> Result<(), StoreError> {
        let _: bool = self.run(&self.scripts.forget, key, |_| vec![]).await?;
        Ok(())
    }

    fn settle_abandoned(&self, ticket: WriteTicket) {
        // No await possible here. The lease makes the reservation expire into "unknown" on its own;
        // settling now only shortens the wait, when a runtime is still there to do it.
        let key = ticket.key.clone();
        tracing::debug!(%key, "write abandoned: its lease will expire as an unknown outcome");
    }
}
