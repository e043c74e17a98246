//! The Redis protocol of the cache, single node or cluster: one `MGET` per read in the
//! steady state, `SET NX` for missing stamps, `SET PX` for entries, `SET` of fresh tokens to
//! invalidate; every operation by a deadline (the response timeout, or less when the call's
//! budget ends sooner).
//!
//! Invalidations and stamp creation also maintain the namespace's invalidation sequence
//! ([`Seq`]): on a single node one script does it with the writes; on a cluster one script on
//! the sequence key's node runs first, then the writes carry what it returned.
//!
//! On a cluster, entry and tag keys live in different slots. `MGET` is split per slot
//! (`backend::cluster`, one request per slot, sent concurrently); creating missing stamps and
//! invalidating several tags use one small single-key pipeline per key, sent concurrently,
//! because a cross-slot pipeline would be rejected.

use super::connect::{Conn, Connections};
use super::near::NearCache;
use super::{MAX_KEYS_PER_COMMAND, Read, ReadMany, Settled, StampKey, StoreError, link};
use crate::keyspace::{Seq, new_token};
use bytes::Bytes;
use futures_util::future::try_join_all;
use redis::{Cmd, Pipeline};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct RedisStore {
    conns: Connections,
    deadline: Duration,
    /// After a bump, `WAIT` for this many replicas, at most this long.
    replicas: Option<(usize, Duration)>,
    /// The namespace's sequence key (`{ns}:q`).
    sequence_key: String,
}

/// Lua shared by the scripts: `seq(key, epoch, step)` reads the sequence (creating it in
/// `epoch` at count 0 when missing or malformed) and advances it by `step` (0 or 1; -1 starts
/// `epoch` at count 1 whatever is there); `put(key, token, ttl, nx)` writes one stamp.
const LIB: &str = r"
local function seq(key, epoch, step)
  local v = redis.call('GET', key)
  local valid = v and string.len(v) == 16 and step >= 0
  if step < 0 then step = 1 end
  local e, n = epoch, 0
  if valid then
    e = string.sub(v, 1, 8)
    for i = 9, 16 do n = n * 256 + string.byte(v, i) end
    if step == 0 then return v end
  end
  n = n + step
  local b = {}
  for i = 8, 1, -1 do b[i] = string.char(n % 256); n = math.floor(n / 256) end
  v = e .. table.concat(b)
  redis.call('SET', key, v)
  return v
end
local function put(key, token, ttl, nx)
  local args = {'SET', key, token}
  if nx then table.insert(args, 'NX') end
  if ttl > 0 then table.insert(args, 'EX'); table.insert(args, ttl) end
  redis.call(unpack(args))
end
";

/// `KEYS = [sequence, stamp…]`, `ARGV = [epoch, (random tail, ttl)…]`: advances the sequence
/// and writes every stamp a token at it (an invalidation, single node).
const BUMP: &str = r"
local s = seq(KEYS[1], ARGV[1], 1)
for i = 2, #KEYS do put(KEYS[i], s .. ARGV[2 * i - 2], tonumber(ARGV[2 * i - 1]), false) end
return s
";

/// As [`BUMP`], but reads the sequence and creates only missing stamps, at the current
/// sequence; returns `[sequence, token…]` (single node).
const CREATE: &str = r"
local s = seq(KEYS[1], ARGV[1], 0)
local out = {s}
for i = 2, #KEYS do
  put(KEYS[i], s .. ARGV[2 * i - 2], tonumber(ARGV[2 * i - 1]), true)
  out[i] = redis.call('GET', KEYS[i])
end
return out
";

/// `KEYS = [sequence]`, `ARGV = [epoch, step]`: the sequence, advanced by `step` (cluster:
/// the first half of [`BUMP`] or [`CREATE`]).
const SEQ: &str = r"
return seq(KEYS[1], ARGV[1], tonumber(ARGV[2]))
";

/// `KEYS = [stamp]`, `ARGV = [token, ttl]`: writes a sequenced token unless the stamp holds
/// one of the same epoch at a count at least as high (cluster: the second half of [`BUMP`],
/// sent apart from the sequence's script, so an earlier invalidation's write that arrives
/// late must not put an older count back; an equal count is the same invalidation, written
/// again). A missing stamp or a creation marker (count byte 0xFF) gets a new marker: a write
/// that finds the key gone may be late, after a newer one that was evicted, and the next
/// reader turns the marker into a token at the sequence it reads then. Returns -1 when
/// written, else the count it kept.
const PUT: &str = r"
local function count(v)
  local n = 0
  for i = 9, 16 do n = n * 256 + string.byte(v, i) end
  return n
end
local cur, new = redis.call('GET', KEYS[1]), ARGV[1]
if cur and string.len(cur) == 24 and string.len(new) == 24
   and string.sub(cur, 1, 8) == string.sub(new, 1, 8) and string.byte(cur, 9) ~= 255
   and count(cur) > count(new) then
  return count(cur)
end
if not cur or (string.len(cur) == 24 and string.byte(cur, 9) == 255) then
  new = string.sub(new, 1, 8) .. string.rep(string.char(255), 8) .. string.sub(new, 17, 24)
end
put(KEYS[1], new, tonumber(ARGV[2]), false)
return -1
";

/// `KEYS = [stamp]`, `ARGV = [marker, token, ttl]`: replaces a creation marker with `token`
/// if the stamp still holds that marker; returns the stamp's token (cluster creation).
const SWAP: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then put(KEYS[1], ARGV[2], tonumber(ARGV[3]), false) end
return redis.call('GET', KEYS[1])
";

/// `KEYS = [lease]`, `ARGV = [token, ttl ms]`: `SET NX PX` of the token; 1 when it was set or
/// the lease already holds this token, else 0.
const TAKE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
";

/// `KEYS = [lease]`, `ARGV = [token]`: deletes the lease if it still holds `token`.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
";

fn release_cmd(lease: &str, token: &[u8]) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(RELEASE).arg(1).arg(lease).arg(token);
    cmd
}

/// [`PUT`] of `token` into `stamp`.
fn put_cmd(stamp: &StampKey, token: &[u8]) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(format!("{LIB}{PUT}"))
        .arg(1)
        .arg(&stamp.key)
        .arg(token)
        .arg(stamp.ttl.map_or(0, |t| t.as_secs().max(1)));
    cmd
}

/// `EVAL` of `LIB` + `body` with `keys` and per-stamp arguments after the epoch.
fn script(body: &str, sequence_key: &str, stamps: &[&StampKey], extra: Option<i8>) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(format!("{LIB}{body}"))
        .arg(1 + stamps.len())
        .arg(sequence_key);
    for s in stamps {
        cmd.arg(&s.key);
    }
    cmd.arg(&Seq::fresh().bytes()[..8]);
    if let Some(step) = extra {
        cmd.arg(step);
    }
    for s in stamps {
        cmd.arg(&new_token()[..8])
            .arg(s.ttl.map_or(0, |t| t.as_secs().max(1)));
    }
    cmd
}

impl RedisStore {
    /// A store on `conns` whose operations each get `deadline` (the response timeout) unless
    /// the caller's budget ends sooner; bumps also wait for `replicas`.
    pub(crate) fn new(
        conns: Connections,
        deadline: Duration,
        replicas: Option<(usize, Duration)>,
        sequence_key: String,
    ) -> Self {
        RedisStore {
            conns,
            deadline,
            replicas,
            sequence_key,
        }
    }

    /// When an operation starting now must be over.
    pub(crate) fn until(&self) -> Instant {
        Instant::now() + self.deadline
    }

    /// The response timeout: the deadline of one operation.
    pub(crate) fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Runs `op` on a connection, all of it (waiting for a connection included) by `until`.
    /// A connection that times out is discarded (a silent link would never fail on its own);
    /// an operation that failed on a connection made before it, because that connection
    /// broke, runs once more on a new one while time remains.
    async fn run<T, F, Fut>(&self, until: Instant, op: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_on(false, until, op).await
    }

    /// [`run`](Self::run) on the connection kept for requests that block theirs when
    /// `blocking`.
    async fn run_on<T, F, Fut>(
        &self,
        blocking: bool,
        until: Instant,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut retried = false;
        let mut reread = 0;
        loop {
            let got = self.conns.get(blocking);
            let (conn, fresh) = match tokio::time::timeout_at(until, got).await {
                Ok(got) => got?,
                Err(_) => return Err(StoreError::Timeout(self.deadline)),
            };
            let used = conn.clone();
            match tokio::time::timeout_at(until, op(conn)).await {
                Ok(Ok(v)) if used.consistent() => return Ok(v),
                // A cluster node connection was made meanwhile (see `ClusterConn`): again,
                // a few times (connections are made once per node, then kept).
                Ok(Ok(_)) if reread < CONSISTENT_TRIES => reread += 1,
                Ok(Ok(_)) => {
                    return Err(StoreError::Redis(redis::RedisError::from((
                        redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain),
                        "Redis Cluster connections kept changing during the operation",
                    ))));
                }
                Ok(Err(e)) if !fresh && !retried && link::breaks_connection(&e) => retried = true,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    used.discard();
                    return Err(StoreError::Timeout(self.deadline));
                }
            }
        }
    }

    /// One round trip for the entry and its stamps (two when stamps must be created), all
    /// by `until`. With a near cache the `MGET` goes over its tracking connection and what
    /// it returns is kept there (`entry_ttl` at most).
    pub(crate) async fn read(
        &self,
        entry: &str,
        entry_ttl: Duration,
        stamps: &[StampKey],
        near: Option<&NearCache>,
        until: Instant,
    ) -> Result<Read, StoreError> {
        let read = self
            .read_many(&[entry], entry_ttl, stamps, near, until)
            .await?;
        let [entry] = <[Option<Bytes>; 1]>::try_from(read.entries)
            .map_err(|_| unexpected("MGET returned an unexpected number of values"))?;
        // The entry cannot have been stored under a token that did not exist: it is a miss
        // whatever the tokens read now (a server restarted from disk in between could hand
        // back one it held before).
        let created = read.created.contains(&true);
        Ok(Read {
            entry: entry.filter(|_| !created),
            stamps: read.stamps,
            near: None,
        })
    }

    /// `entries` and `stamps` in one `MGET` per [`MAX_KEYS_PER_COMMAND`] keys, then one
    /// script creating the stamps that were missing, all by `until`. With a near cache the
    /// `MGET`s go over its tracking connection and what they return is kept there
    /// (entries `entry_ttl` at most).
    pub(crate) async fn read_many(
        &self,
        entries: &[&str],
        entry_ttl: Duration,
        stamps: &[StampKey],
        near: Option<&NearCache>,
        until: Instant,
    ) -> Result<ReadMany, StoreError> {
        let keys: Vec<&str> = entries
            .iter()
            .copied()
            .chain(stamps.iter().map(|s| s.key.as_str()))
            .collect();
        let seq = near.map(NearCache::seq);
        let mgets: Vec<(Cmd, usize)> = keys
            .chunks(MAX_KEYS_PER_COMMAND)
            .map(|chunk| {
                let mut mget = redis::cmd("MGET");
                chunk.iter().for_each(|k| {
                    mget.arg(*k);
                });
                (mget, chunk.len())
            })
            .collect();
        // Every chunk on one connection, so the values all come from the server that
        // connection was checked against (a restart from disk between two chunks breaks it:
        // the whole read is made again on a new, checked connection).
        let (mgets, pipelined) = (&mgets[..], !self.conns.is_cluster());
        let mut values: Vec<Option<Bytes>> = match near {
            None => {
                self.run(
                    until,
                    |c| async move { mget_all(c, mgets, pipelined).await },
                )
                .await?
            }
            Some(near) => {
                near.read(until, self.deadline, |c| mget_all(c, mgets, pipelined))
                    .await?
            }
        };
        if values.len() != keys.len() {
            return Err(unexpected("MGET returned an unexpected number of values"));
        }
        if let (Some(near), Some(seq)) = (near, seq) {
            near.fill(seq, (entries, entry_ttl), stamps, &values);
        }
        let mut tokens = values.split_off(entries.len());
        // A creation marker (cluster) is a stamp being created: finish the creation, so every
        // caller ends with the same token.
        let unset = |v: &Option<Bytes>| v.as_deref().is_none_or(is_marker);
        let created: Vec<bool> = tokens.iter().map(unset).collect();
        let missing: Vec<&StampKey> = stamps
            .iter()
            .zip(&created)
            .filter(|(_, c)| **c)
            .map(|(s, _)| s)
            .collect();
        // First use of a tag, or its key expired or was evicted: create it with a random
        // token unless a concurrent caller won the race, and use whichever token is there.
        let mut made = Vec::with_capacity(missing.len());
        for chunk in missing.chunks(MAX_KEYS_PER_COMMAND - 1) {
            made.extend(self.create_stamps(chunk, until).await?);
        }
        let mut made = made.into_iter();
        for v in tokens.iter_mut().filter(|v| unset(v)) {
            *v = made.next().flatten();
        }
        Ok(ReadMany {
            entries: values,
            stamps: tokens.into_iter().map(Option::unwrap_or_default).collect(),
            created,
        })
    }

    /// The sequence, then each of `missing` created at it unless present (the sequence key
    /// itself reads as the sequence): one script on a single node; on a cluster, the
    /// sequence's script then one `SET NX` + `GET` per key.
    async fn create_stamps(
        &self,
        missing: &[&StampKey],
        until: Instant,
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        let (seq, tokens) = self.settle_keys(missing, until).await?;
        let mut tokens = tokens.into_iter();
        Ok(missing
            .iter()
            .map(|k| {
                if k.key == self.sequence_key {
                    Some(seq.clone())
                } else {
                    tokens.next().flatten()
                }
            })
            .collect())
    }

    /// The sequence now and the tokens of `keys` (the sequence key excluded), each created
    /// at the sequence when missing.
    ///
    /// On a cluster the sequence is read apart from the writes, so a stamp is created as a
    /// *marker* (a count no reader accepts), then the sequence is read again and the marker
    /// replaced by a token at that count: an invalidation of the stamp written, then evicted,
    /// between the first read and the creation cannot be undone by an older count.
    async fn settle_keys(
        &self,
        keys: &[&StampKey],
        until: Instant,
    ) -> Result<(Bytes, Vec<Option<Bytes>>), StoreError> {
        let stamps: Vec<&StampKey> = keys
            .iter()
            .copied()
            .filter(|k| k.key != self.sequence_key)
            .collect();
        let stamps = &stamps;
        let q = self.sequence_key.as_str();
        let mut values: Vec<Option<Bytes>> = if !self.conns.is_cluster() {
            let cmd = &script(CREATE, q, stamps, None);
            self.run(until, |mut c| async move { cmd.query_async(&mut c).await })
                .await?
        } else {
            self.run(until, |mut c| async move {
                let seq: Bytes = script(SEQ, q, &[], Some(0)).query_async(&mut c).await?;
                let got = try_join_all(stamps.iter().map(|s| {
                    let (mut c, marker) = (c.clone(), marker(&seq));
                    let mut set = redis::cmd("SET");
                    set.arg(&s.key).arg(&marker).arg("NX");
                    if let Some(ttl) = s.ttl {
                        set.arg("EX").arg(ttl.as_secs().max(1));
                    }
                    let mut pipe = redis::pipe();
                    pipe.add_command(set).ignore().cmd("GET").arg(&s.key);
                    async move {
                        let (now,): (Option<Bytes>,) = pipe.query_async(&mut c).await?;
                        Ok::<_, redis::RedisError>(now)
                    }
                }))
                .await?;
                // Markers (ours, or left by a call that did not finish) become tokens at the
                // sequence as it is now.
                let mut after = None;
                let mut values = vec![Some(seq.clone())];
                for (s, now) in stamps.iter().zip(got) {
                    let value = match now {
                        Some(m) if is_marker(&m) => {
                            let after = match &after {
                                Some(a) => Bytes::clone(a),
                                None => {
                                    let a: Bytes =
                                        script(SEQ, q, &[], Some(0)).query_async(&mut c).await?;
                                    after.insert(a).clone()
                                }
                            };
                            let mut swap = redis::cmd("EVAL");
                            swap.arg(format!("{LIB}{SWAP}"))
                                .arg(1)
                                .arg(&s.key)
                                .arg(&m[..])
                                .arg(sequenced_token(&after))
                                .arg(s.ttl.map_or(0, |t| t.as_secs().max(1)));
                            swap.query_async(&mut c).await?
                        }
                        other => other,
                    };
                    values.push(value);
                }
                // The sequence the tokens were created at, when later than the first read.
                if let Some(after) = after {
                    values[0] = Some(after);
                }
                Ok(values)
            })
            .await?
        };
        if values.len() != stamps.len() + 1 {
            return Err(unexpected(
                "the stamp script returned an unexpected number of values",
            ));
        }
        let seq = values.remove(0).unwrap_or_default();
        Ok((seq, values))
    }

    /// The current tokens of `keys`, none created (`None`: missing), over `near`'s tracking
    /// connection when given (what it returns is kept there).
    pub(crate) async fn stamps(
        &self,
        keys: &[StampKey],
        near: Option<&NearCache>,
        until: Instant,
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        let mut mget = redis::cmd("MGET");
        keys.iter().for_each(|k| {
            mget.arg(&k.key);
        });
        let mget = &mget;
        let values: Vec<Option<Bytes>> = match near {
            None => {
                self.run(until, |mut c| async move { mget.query_async(&mut c).await })
                    .await?
            }
            Some(near) => {
                let seq = near.seq();
                let values = near
                    .read(until, self.deadline, |mut c| async move {
                        mget.query_async(&mut c).await
                    })
                    .await?;
                if values.len() == keys.len() {
                    near.fill_stamps(seq, keys, &values);
                }
                values
            }
        };
        if values.len() != keys.len() {
            return Err(unexpected("MGET returned an unexpected number of values"));
        }
        Ok(values)
    }

    /// The sequence now and the tokens of `keys`, created at it when missing.
    pub(crate) async fn settle(
        &self,
        keys: &[StampKey],
        until: Instant,
    ) -> Result<Settled, StoreError> {
        let refs: Vec<&StampKey> = keys.iter().collect();
        let (seq, tokens) = self.settle_keys(&refs, until).await?;
        Ok(Settled {
            seq,
            tokens: tokens.into_iter().map(Option::unwrap_or_default).collect(),
        })
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        self.run(self.until(), |mut c| async move {
            redis::cmd("PING").query_async::<()>(&mut c).await
        })
        .await
    }

    pub(crate) async fn write(
        &self,
        entry: &str,
        bytes: Vec<u8>,
        ttl: Duration,
        until: Instant,
    ) -> Result<(), StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(entry).arg(bytes).arg("PX").arg(millis(ttl));
        let set = &set;
        self.run(
            until,
            |mut c| async move { set.query_async::<()>(&mut c).await },
        )
        .await
    }

    /// [`write`](Self::write), then the lease held on computing the entry released: in one
    /// round trip on a single node (a pipeline, in that order); on a cluster, where the keys'
    /// slots differ, the release is sent once the write succeeded. A failed release is not
    /// a failed write: the lease expires.
    pub(crate) async fn write_released(
        &self,
        entry: &str,
        bytes: Vec<u8>,
        ttl: Duration,
        (lease, token): (&str, &[u8]),
        until: Instant,
    ) -> Result<(), StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(entry).arg(bytes).arg("PX").arg(millis(ttl));
        let release = release_cmd(lease, token);
        let (set, release) = (&set, &release);
        if self.conns.is_cluster() {
            self.run(
                until,
                |mut c| async move { set.query_async::<()>(&mut c).await },
            )
            .await?;
            let _ = self
                .run(until, |mut c| async move {
                    release.query_async::<()>(&mut c).await
                })
                .await;
            return Ok(());
        }
        self.run(until, |mut c| async move {
            let mut pipe = redis::pipe();
            pipe.add_command(set.clone())
                .ignore()
                .add_command(release.clone())
                .ignore();
            pipe.query_async::<()>(&mut c).await
        })
        .await
    }

    /// Takes `lease` with `token` for `ttl` unless another token holds it (`SET NX PX`, in a
    /// script that also answers "taken" when `token` already holds it: a request run again
    /// on a new connection must not find its own lease taken), by `until`.
    pub(crate) async fn lease(
        &self,
        lease: &str,
        token: &[u8],
        ttl: Duration,
        until: Instant,
    ) -> Result<bool, StoreError> {
        let mut take = redis::cmd("EVAL");
        take.arg(TAKE).arg(1).arg(lease).arg(token).arg(millis(ttl));
        let take = &take;
        let taken: i64 = self
            .run(until, |mut c| async move { take.query_async(&mut c).await })
            .await?;
        Ok(taken == 1)
    }

    /// Deletes `lease` if it still holds `token` (a lease that expired may have been taken
    /// by another caller since), by `until`.
    pub(crate) async fn release(
        &self,
        lease: &str,
        token: &[u8],
        until: Instant,
    ) -> Result<(), StoreError> {
        let release = &release_cmd(lease, token);
        self.run(until, |mut c| async move {
            release.query_async::<()>(&mut c).await
        })
        .await
    }

    /// `DEL` of one entry, by `until`.
    pub(crate) async fn delete(&self, entry: &str, until: Instant) -> Result<(), StoreError> {
        self.run(until, |mut c| async move {
            redis::cmd("DEL").arg(entry).query_async::<()>(&mut c).await
        })
        .await
    }

    /// Stores `entries` by `until`: one pipeline of `SET … PX` per [`MAX_KEYS_PER_COMMAND`]
    /// entries on a single node; on a cluster, whose pipelines cannot cross slots, one `SET`
    /// per entry, sent concurrently.
    pub(crate) async fn write_many(
        &self,
        entries: Vec<(String, Vec<u8>)>,
        ttl: Duration,
        until: Instant,
    ) -> Result<(), StoreError> {
        let set = |(entry, bytes): (String, Vec<u8>)| {
            let mut set = redis::cmd("SET");
            set.arg(entry).arg(bytes).arg("PX").arg(millis(ttl));
            set
        };
        let sets: Vec<Cmd> = entries.into_iter().map(set).collect();
        if self.conns.is_cluster() {
            let sets = &sets;
            return self
                .run(until, |c| async move {
                    try_join_all(sets.iter().map(|set| {
                        let mut c = c.clone();
                        async move { set.query_async::<()>(&mut c).await }
                    }))
                    .await
                    .map(drop)
                })
                .await;
        }
        for chunk in sets.chunks(MAX_KEYS_PER_COMMAND) {
            let mut pipe = redis::pipe();
            for set in chunk {
                pipe.add_command(set.clone()).ignore();
            }
            let pipe = &pipe;
            self.run(until, |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await?;
        }
        Ok(())
    }

    /// Advances the sequence and replaces the tokens of `keys` with fresh ones written at it,
    /// by `until` (plus the replicas' wait), then, when replicas are asked for, waits for them
    /// to acknowledge: fewer in time is an error (the invalidation stays pending and is sent
    /// again).
    pub(crate) async fn bump(&self, keys: &[StampKey], until: Instant) -> Result<(), StoreError> {
        let until = until + self.replicas.map_or(Duration::ZERO, |(_, wait)| wait);
        let wait = |pipe: &mut Pipeline| {
            if let Some((n, wait)) = self.replicas {
                pipe.cmd("WAIT").arg(n).arg(millis(wait));
            }
        };
        let q = self.sequence_key.as_str();
        let acked: Vec<i64> = if !self.conns.is_cluster() {
            // One script and its `WAIT`.
            let refs: Vec<&StampKey> = keys.iter().collect();
            let mut pipe = redis::pipe();
            pipe.add_command(script(BUMP, q, &refs, None)).ignore();
            wait(&mut pipe);
            let pipe = &pipe;
            self.run_on(self.replicas.is_some(), until, |mut c| async move {
                pipe.query_async::<Vec<i64>>(&mut c).await
            })
            .await?
        } else {
            // The sequence's node first, then one pipeline per key (its write, then the `WAIT`
            // on that key's node).
            self.run_on(self.replicas.is_some(), until, |c| async move {
                let replicas = self.replicas;
                let mut acked = Vec::new();
                let seq = advance(&c, q, 1, replicas, &mut acked).await?;
                let mut done = put_all(&c, &seq, keys.iter().collect(), replicas).await?;
                // A stamp that kept a count above ours: a newer invalidation's, or one from
                // before the sequence went back (its node restarted from older data, or failed
                // over to a replica behind it), which would swallow this one. Write those again
                // at a count taken now; one still refused means the sequence is behind it:
                // start a new epoch and write again.
                let again = refused(&done);
                if !again.is_empty() {
                    let now = advance(&c, q, 1, replicas, &mut acked).await?;
                    let second = put_all(&c, &now, again, replicas).await?;
                    let behind = refused(&second);
                    done.extend(second);
                    if !behind.is_empty() {
                        let fresh = advance(&c, q, -1, replicas, &mut acked).await?;
                        done.extend(put_all(&c, &fresh, behind, replicas).await?);
                    }
                }
                acked.extend(done.into_iter().flat_map(|(_, r)| r.into_iter().skip(1)));
                Ok(acked)
            })
            .await?
        };
        if let Some((wanted, _)) = self.replicas {
            let least = acked.iter().copied().min().unwrap_or(0);
            if least < i64::try_from(wanted).unwrap_or(i64::MAX) {
                return Err(StoreError::NotReplicated {
                    acked: least,
                    wanted,
                });
            }
        }
        Ok(())
    }
}

/// The values of `mgets` (each with the number of keys it reads), in order, all read on the
/// connection `c`: one pipeline (one round trip) when `pipelined`, else one request after
/// another (a cluster, whose pipelines cannot span slots). Each reply must have as many
/// values as its request has keys, or no value could be trusted to be its key's.
async fn mget_all<C: redis::aio::ConnectionLike>(
    mut c: C,
    mgets: &[(Cmd, usize)],
    pipelined: bool,
) -> redis::RedisResult<Vec<Option<Bytes>>> {
    let unexpected = || {
        redis::RedisError::from((
            redis::ErrorKind::Parse,
            "MGET returned an unexpected number of values",
        ))
    };
    // One chunk (every single read, most batches): its reply is the values, not copied.
    if let [(one, n)] = mgets {
        let values: Vec<Option<Bytes>> = one.query_async(&mut c).await?;
        return if values.len() == *n {
            Ok(values)
        } else {
            Err(unexpected())
        };
    }
    let mut parts: Vec<Vec<Option<Bytes>>> = Vec::with_capacity(mgets.len());
    if pipelined {
        let mut pipe = redis::pipe();
        mgets.iter().for_each(|(m, _)| {
            pipe.add_command(m.clone());
        });
        parts = pipe.query_async(&mut c).await?;
    } else {
        for (m, _) in mgets {
            parts.push(m.query_async(&mut c).await?);
        }
    }
    let lengths = parts.iter().map(Vec::len);
    if parts.len() != mgets.len() || !lengths.eq(mgets.iter().map(|(_, n)| *n)) {
        return Err(unexpected());
    }
    Ok(parts.concat())
}

/// Writes each of `keys` a token at `seq` with [`PUT`] (cluster), each followed by the
/// `WAIT` for `replicas`: per key, what `PUT` kept (-1: written) and the replicas' count.
async fn put_all<'k>(
    c: &Conn,
    seq: &[u8],
    keys: Vec<&'k StampKey>,
    replicas: Option<(usize, Duration)>,
) -> redis::RedisResult<Vec<(&'k StampKey, Vec<i64>)>> {
    try_join_all(keys.into_iter().map(|k| {
        let mut c = c.clone();
        let mut pipe = redis::pipe();
        pipe.add_command(put_cmd(k, &sequenced_token(seq)));
        if let Some((n, wait)) = replicas {
            pipe.cmd("WAIT").arg(n).arg(millis(wait));
        }
        async move {
            let replies = pipe.query_async::<Vec<i64>>(&mut c).await?;
            Ok((k, replies))
        }
    }))
    .await
}

/// [`SEQ`] by `step` on the sequence's node (cluster), followed there by the `WAIT` for
/// `replicas` (a replica promoted later must not hand back an older sequence), whose count
/// goes to `acked`.
async fn advance(
    c: &Conn,
    q: &str,
    step: i8,
    replicas: Option<(usize, Duration)>,
    acked: &mut Vec<i64>,
) -> redis::RedisResult<Bytes> {
    let mut c = c.clone();
    let Some((n, wait)) = replicas else {
        return script(SEQ, q, &[], Some(step)).query_async(&mut c).await;
    };
    let mut pipe = redis::pipe();
    pipe.add_command(script(SEQ, q, &[], Some(step)))
        .cmd("WAIT")
        .arg(n)
        .arg(millis(wait));
    let (seq, replicated): (Bytes, i64) = pipe.query_async(&mut c).await?;
    acked.push(replicated);
    Ok(seq)
}

/// The keys whose [`PUT`] kept a higher count (see [`RedisStore::bump`]).
fn refused<'k>(done: &[(&'k StampKey, Vec<i64>)]) -> Vec<&'k StampKey> {
    done.iter()
        .filter(|(_, r)| r.first().is_some_and(|kept| *kept >= 0))
        .map(|(k, _)| *k)
        .collect()
}

/// A token written at the sequence `seq` (as read from Redis): `seq` and a random tail.
fn sequenced_token(seq: &[u8]) -> Vec<u8> {
    let mut token = seq.to_vec();
    token.extend_from_slice(&new_token()[..8]);
    token
}

/// A creation marker in `seq`'s epoch: a count no sequence reaches (first count byte 0xFF),
/// and a random tail that tells markers apart.
fn marker(seq: &[u8]) -> Vec<u8> {
    let mut token = seq.get(..8).unwrap_or(&[0; 8]).to_vec();
    token.extend_from_slice(&[0xFF; 8]);
    token.extend_from_slice(&new_token()[..8]);
    token
}

fn is_marker(token: &[u8]) -> bool {
    token.len() == 24 && token[8] == 0xFF
}

fn unexpected(what: &'static str) -> StoreError {
    StoreError::Redis(redis::RedisError::from((redis::ErrorKind::Parse, what)))
}

/// How many times an operation that overlapped a new cluster node connection runs again.
const CONSISTENT_TRIES: usize = 3;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The scripts on a real Redis (`REDIS_URL`, by default the local one), on keys of a
/// namespace of their own.
#[cfg(test)]
mod tests {
    use super::*;

    async fn conn() -> redis::aio::MultiplexedConnection {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("a Redis server for the script tests")
    }

    async fn get(c: &mut redis::aio::MultiplexedConnection, k: &StampKey) -> Vec<u8> {
        redis::cmd("GET").arg(&k.key).query_async(c).await.unwrap()
    }

    async fn del(c: &mut redis::aio::MultiplexedConnection, k: &StampKey) {
        redis::cmd("DEL")
            .arg(&k.key)
            .query_async::<()>(c)
            .await
            .unwrap();
    }

    fn stamp(name: &str) -> StampKey {
        let mut key = String::from("cq-unit:");
        crate::keyspace::push_hex(&mut key, &new_token());
        key.push_str(name);
        StampKey {
            key,
            ttl: Some(Duration::from_secs(60)),
        }
    }

    /// Taking a lease is idempotent for its holder (a request sent again after a broken
    /// connection must not find the lease "held by another"), and releasing it deletes only
    /// the holder's own token.
    #[tokio::test]
    async fn a_lease_is_taken_again_by_its_holder_only_and_released_by_it_only() {
        let mut c = conn().await;
        let lease = stamp(":l").key;
        let (mine, theirs) = (new_token(), new_token());
        let take = |token: &[u8]| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(TAKE).arg(1).arg(&lease).arg(token).arg(60_000);
            cmd
        };
        let took = |cmd: Cmd, c: &mut redis::aio::MultiplexedConnection| {
            let mut c = c.clone();
            async move { cmd.query_async::<i64>(&mut c).await.unwrap() }
        };
        assert_eq!(took(take(&mine), &mut c).await, 1);
        assert_eq!(took(take(&mine), &mut c).await, 1, "the same token again");
        assert_eq!(took(take(&theirs), &mut c).await, 0);
        release_cmd(&lease, &theirs)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        let held: Vec<u8> = redis::cmd("GET")
            .arg(&lease)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(held, mine, "another token's release leaves it");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&lease)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!((1..=60_000).contains(&ttl), "{ttl}");
        release_cmd(&lease, &mine)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&lease)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(exists, 0);
        assert_eq!(took(take(&theirs), &mut c).await, 1, "free again");
        release_cmd(&lease, &theirs)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_late_write_never_puts_an_older_count_back() {
        let mut c = conn().await;
        let k = stamp(":t");
        let seq = Seq::fresh();
        let (older, newer) = (seq.next(), seq.next().next());
        // A missing stamp gets a marker (the write may be late after an eviction)…
        put_cmd(&k, &newer.token())
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        let now = get(&mut c, &k).await;
        assert!(is_marker(&now));
        // …and an existing token is only replaced by a count at least as high.
        let _: () = redis::cmd("SET")
            .arg(&k.key)
            .arg(newer.token())
            .query_async(&mut c)
            .await
            .unwrap();
        put_cmd(&k, &older.token())
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        let now = get(&mut c, &k).await;
        assert_eq!(Seq::of_token(&now), Some(newer), "the later count stays");
        // Another epoch (the sequence key was lost) or a token without one: replaced.
        let other = Seq::fresh().next();
        put_cmd(&k, &other.token())
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        let now = get(&mut c, &k).await;
        assert_eq!(Seq::of_token(&now), Some(other));
        let ttl: i64 = redis::cmd("TTL")
            .arg(&k.key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!((1..=60).contains(&ttl), "{ttl}");
        del(&mut c, &k).await;
    }

    #[tokio::test]
    async fn a_creation_marker_is_replaced_by_its_creator_or_any_write() {
        let mut c = conn().await;
        let k = stamp(":t");
        let seq = Seq::fresh().next().bytes();
        let mark = marker(&seq);
        assert!(is_marker(&mark) && Seq::of_token(&mark).is_some_and(|m| m.count() > 1 << 56));
        let swap = |expected: &[u8], token: &[u8]| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(format!("{LIB}{SWAP}"))
                .arg(1)
                .arg(&k.key)
                .arg(expected)
                .arg(token)
                .arg(60);
            cmd
        };
        let _: () = redis::cmd("SET")
            .arg(&k.key)
            .arg(&mark)
            .query_async(&mut c)
            .await
            .unwrap();
        let token = sequenced_token(&seq);
        let other: Vec<u8> = swap(&marker(&seq), &token)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(other, mark, "another marker is not ours to replace");
        let now: Vec<u8> = swap(&mark, &token).query_async(&mut c).await.unwrap();
        assert_eq!(now, token);
        // An invalidation's write replaces a marker whatever its count.
        let _: () = redis::cmd("SET")
            .arg(&k.key)
            .arg(&mark)
            .query_async(&mut c)
            .await
            .unwrap();
        let kept: i64 = put_cmd(&k, &token).query_async(&mut c).await.unwrap();
        assert_eq!(kept, -1, "written");
        let now = get(&mut c, &k).await;
        assert!(
            is_marker(&now) && now != mark,
            "over a marker, a new marker"
        );
        let _: () = redis::cmd("SET")
            .arg(&k.key)
            .arg(&token)
            .query_async(&mut c)
            .await
            .unwrap();
        let kept: i64 = put_cmd(&k, &token).query_async(&mut c).await.unwrap();
        assert_eq!(kept, -1, "the same count is written again");
        let lower = sequenced_token(&Seq::fresh().bytes());
        let mut lower_same_epoch = token[..8].to_vec();
        lower_same_epoch.extend_from_slice(&lower[8..]);
        let kept: i64 = put_cmd(&k, &lower_same_epoch)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(
            kept, 1,
            "a lower count is refused, and the kept count reported"
        );
        del(&mut c, &k).await;
    }

    #[tokio::test]
    async fn bump_advances_the_sequence_and_create_reads_it() {
        let mut c = conn().await;
        let (q, a, b) = (stamp(":q"), stamp(":a"), stamp(":b"));
        let created: Vec<Vec<u8>> = script(CREATE, &q.key, &[&a], None)
            .query_async(&mut c)
            .await
            .unwrap();
        let start = Seq::parse(&created[0]).unwrap();
        assert_eq!(Seq::of_token(&created[1]), Some(start));
        let _: Vec<u8> = script(BUMP, &q.key, &[&a, &b], None)
            .query_async(&mut c)
            .await
            .unwrap();
        let again: Vec<Vec<u8>> = script(CREATE, &q.key, &[&a, &b], None)
            .query_async(&mut c)
            .await
            .unwrap();
        let now = Seq::parse(&again[0]).unwrap();
        assert_eq!(now, start.next());
        assert_eq!(
            Seq::of_token(&again[1]),
            Some(now),
            "bumped, not created again"
        );
        assert_eq!(Seq::of_token(&again[2]), Some(now));
        // A malformed sequence value is replaced, in a new epoch.
        let _: () = redis::cmd("SET")
            .arg(&q.key)
            .arg("garbage")
            .query_async(&mut c)
            .await
            .unwrap();
        let seq: Vec<u8> = script(SEQ, &q.key, &[], Some(1))
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(Seq::parse(&seq).is_some_and(|s| !s.same_epoch(&now)));
        for k in [&q, &a, &b] {
            del(&mut c, k).await;
        }
    }
}
