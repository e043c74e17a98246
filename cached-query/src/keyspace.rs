//! The key space: every Redis key name the crate writes (entries, tags, the namespace
//! generation, sessions), all under `{namespace}:`, and the random version tokens of stamps.
//!
//! ```text
//! {ns}:g            namespace generation token (`clear()` replaces it)
//! {ns}:q            invalidation sequence: 8-byte epoch, 8-byte count (see [`Seq`])
//! {ns}:s            `run_id` of the Redis server the namespace was last made safe on
//! {ns}:s:{n}        the same, per Redis Cluster master (`n` picks a slot the node serves)
//! {ns}:t:{32 hex}   tag version token (first 16 bytes of sha256(tag))
//! {ns}:e:{64 hex}   cached entry (sha256 of the call's canonical key document)
//! {ns}:l:{32 hex}   lease on computing an entry under given stamps (sha256 of both)
//! {ns}:session:{64 hex}   tower-sessions record (sha256 of the session id)
//! ```
//!
//! A tag is a *version stamp*, not a set of entry keys: invalidating it writes a fresh random
//! token (O(1) whatever the number of entries), and every entry stores the tokens it was
//! computed under. A missing tag key is re-created with a new random token, so eviction or
//! expiry can only cause misses — it never makes an old entry valid again.

use sha2::{Digest, Sha256};

/// Length in bytes of a version token.
pub(crate) const TOKEN_LEN: usize = 16;

/// A fresh random version token.
pub(crate) fn new_token() -> Vec<u8> {
    let mut token = vec![0u8; TOKEN_LEN];
    getrandom::fill(&mut token).expect("the operating system's random source failed");
    token
}

/// The key holding this namespace's invalidation sequence ([`Seq`]).
pub(crate) fn sequence_key(namespace: &str) -> String {
    format!("{namespace}{SEQUENCE_SUFFIX}")
}

const SEQUENCE_SUFFIX: &str = ":q";

/// Whether `key` may be a namespace's sequence key (as made by [`sequence_key`]): no entry
/// is stamped with it, so the near cache need not recheck entries when it changes. (No
/// entry, tag, generation or server key ends this way.)
pub(crate) fn is_sequence_key(key: &str) -> bool {
    key.ends_with(SEQUENCE_SUFFIX)
}

/// A point in a namespace's invalidation sequence: every invalidation advances `count` by one
/// and writes each tag it bumps a token starting with the sequence it took (a *sequenced
/// token*: 8 epoch bytes, 8 count bytes big-endian, 8 random bytes); a stamp created because
/// it was missing starts with the current sequence. A result tag is only known after its
/// query ran, so the read path takes the sequence before the query and stores the result only
/// if every result tag's token is no newer than that: a tag bumped after the query started
/// carries a later count. The epoch is drawn when the sequence key is created (first use,
/// eviction): counts of different epochs are not comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seq {
    epoch: [u8; 8],
    count: u64,
}

/// Length of the sequence key's value.
pub(crate) const SEQ_LEN: usize = 16;

impl Seq {
    /// A sequence at count 0 in a new random epoch.
    pub(crate) fn fresh() -> Seq {
        let mut epoch = [0u8; 8];
        getrandom::fill(&mut epoch).expect("the operating system's random source failed");
        Seq { epoch, count: 0 }
    }

    /// The sequence key's value (exactly [`SEQ_LEN`] bytes), or `None` for anything else.
    pub(crate) fn parse(value: &[u8]) -> Option<Seq> {
        let value: &[u8; SEQ_LEN] = value.try_into().ok()?;
        let (epoch, count) = value.split_at(8);
        Some(Seq {
            epoch: epoch.try_into().ok()?,
            count: u64::from_be_bytes(count.try_into().ok()?),
        })
    }

    /// The sequence a sequenced token was written at; `None` for other tokens (random ones
    /// written by earlier versions, garbage).
    pub(crate) fn of_token(token: &[u8]) -> Option<Seq> {
        if token.len() != SEQ_LEN + 8 {
            return None;
        }
        Seq::parse(&token[..SEQ_LEN])
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    pub(crate) fn next(self) -> Seq {
        Seq {
            count: self.count + 1,
            ..self
        }
    }

    pub(crate) fn bytes(&self) -> [u8; SEQ_LEN] {
        let mut out = [0u8; SEQ_LEN];
        out[..8].copy_from_slice(&self.epoch);
        out[8..].copy_from_slice(&self.count.to_be_bytes());
        out
    }

    /// A new sequenced token written at this sequence.
    pub(crate) fn token(&self) -> Vec<u8> {
        let mut token = self.bytes().to_vec();
        token.extend_from_slice(&new_token()[..8]);
        token
    }

    /// Whether a token written at `self` predates (or is at) `before`, in the same epoch.
    pub(crate) fn not_after(&self, before: &Seq) -> bool {
        self.epoch == before.epoch && self.count <= before.count
    }

    pub(crate) fn same_epoch(&self, other: &Seq) -> bool {
        self.epoch == other.epoch
    }
}

/// The key holding this namespace's generation token; `clear()` replaces it.
pub(crate) fn generation_key(namespace: &str) -> String {
    format!("{namespace}:g")
}

/// The key holding the `run_id` of the server this namespace was last made safe on: see
/// `backend::identity`.
pub(crate) fn server_key(namespace: &str) -> String {
    format!("{namespace}:s")
}

/// Candidate `n` for the server key of one Redis Cluster master (`server_key` as made by
/// [`server_key`]): `{n}` is its hash tag, so some small `n` lands in a slot the node serves.
pub(crate) fn node_server_key(server_key: &str, n: u32) -> String {
    format!("{server_key}:{{{n}}}")
}

/// The key holding `tag`'s version token. The tag is hashed, so its text (which usually
/// carries argument values, and may contain `:`, `*`, newlines…) never appears in a key
/// name and cannot address any other key.
pub(crate) fn tag_key(namespace: &str, tag: &str) -> String {
    tag_key_of_hash(namespace, &tag_hash(tag))
}

/// The 16 bytes of sha256 that name `tag`'s key (kept in entries that carry result tags).
pub(crate) fn tag_hash(tag: &str) -> [u8; 16] {
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&sha256(tag.as_bytes())[..16]);
    hash
}

/// The tag key named by a [`tag_hash`].
pub(crate) fn tag_key_of_hash(namespace: &str, hash: &[u8]) -> String {
    hashed_key(namespace, ":t:", hash)
}

/// The key of one cached entry.
pub(crate) fn entry_key(namespace: &str, digest: &[u8; 32]) -> String {
    hashed_key(namespace, ENTRY_MARKER, digest)
}

/// Whether `key` names an entry (as made by [`entry_key`]) rather than a tag version or
/// the namespace generation, whatever the namespace: the near cache tells them apart in
/// Redis's invalidation messages.
pub(crate) fn is_entry_key(key: &str) -> bool {
    const SUFFIX: usize = ENTRY_MARKER.len() + 64;
    let Some(at) = key.len().checked_sub(SUFFIX) else {
        return false;
    };
    let (marker, digest) = key.as_bytes()[at..].split_at(ENTRY_MARKER.len());
    marker == ENTRY_MARKER.as_bytes() && digest.iter().all(u8::is_ascii_hexdigit)
}

const ENTRY_MARKER: &str = ":e:";

/// The key of the lease on computing `entry` under `stamps` (the tokens a miss read): a
/// caller that read other stamps (an invalidation in between) has another lease key, so it
/// never waits for a query that began before an invalidation it has seen.
pub(crate) fn lease_key<S: AsRef<[u8]>>(namespace: &str, entry: &str, stamps: &[S]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(entry.as_bytes());
    for stamp in stamps {
        let stamp = stamp.as_ref();
        hasher.update(u32::try_from(stamp.len()).unwrap_or(u32::MAX).to_le_bytes());
        hasher.update(stamp);
    }
    let hash: [u8; 32] = hasher.finalize().into();
    hashed_key(namespace, ":l:", &hash[..16])
}

/// The key of a session record. The id is a bearer secret: only its hash is in the name.
#[cfg(feature = "sessions")]
pub(crate) fn session_key(namespace: &str, session_id: &str) -> String {
    hashed_key(namespace, ":session:", &sha256(session_id.as_bytes()))
}

/// The raw sha256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Appends `bytes` as lowercase hex.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xF)]));
    }
}

/// `{namespace}{marker}{hex of hash}`.
fn hashed_key(namespace: &str, marker: &str, hash: &[u8]) -> String {
    let mut key = String::with_capacity(namespace.len() + marker.len() + 2 * hash.len());
    key.push_str(namespace);
    key.push_str(marker);
    push_hex(&mut key, hash);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_tags_stay_inside_the_namespace() {
        for tag in ["a:*", "*", "x\ny", "[a-z]?", &"z".repeat(10_000), "ns2:e:1"] {
            let k = tag_key("ns", tag);
            assert!(k.starts_with("ns:t:"));
            assert_eq!(k.len(), "ns:t:".len() + 32);
            assert!(k[5..].bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(tag_key("ns", "a"), tag_key("ns", "b"));
    }

    #[test]
    fn sequence_keys_are_told_from_stamp_keys() {
        for ns in ["ns", "a:q", ""] {
            assert!(is_sequence_key(&sequence_key(ns)));
            assert!(!is_sequence_key(&tag_key(ns, "x:q")));
            assert!(!is_sequence_key(&generation_key(ns)));
            assert!(!is_sequence_key(&server_key(ns)));
            assert!(!is_sequence_key(&entry_key(ns, &[1; 32])));
        }
    }

    #[test]
    fn entry_keys_are_told_from_stamp_keys() {
        for ns in ["ns", "a:e:b", ""] {
            assert!(is_entry_key(&entry_key(ns, &[0xAB; 32])));
            assert!(!is_entry_key(&tag_key(ns, "user:1")));
            assert!(!is_entry_key(&generation_key(ns)));
        }
        assert!(!is_entry_key("e:"));
    }

    #[test]
    fn sequenced_tokens_order_within_an_epoch_only() {
        let s = Seq::fresh();
        let later = s.next();
        assert_eq!(Seq::parse(&s.bytes()), Some(s));
        assert_eq!(Seq::of_token(&later.token()), Some(later));
        assert_ne!(later.token(), later.token(), "random tail");
        assert!(s.not_after(&later) && s.not_after(&s) && !later.not_after(&s));
        let other = Seq::fresh();
        assert!(
            !s.not_after(&other.next()),
            "another epoch is not comparable"
        );
        assert_eq!(
            Seq::of_token(&new_token()),
            None,
            "a random token has no sequence"
        );
        assert_eq!(Seq::parse(b"short"), None);
    }

    #[test]
    fn lease_keys_depend_on_entry_and_every_stamp() {
        let entry = entry_key("ns", &[7; 32]);
        let k = lease_key("ns", &entry, &[b"a".as_slice(), b"b"]);
        assert!(k.starts_with("ns:l:") && k.len() == "ns:l:".len() + 32);
        assert_eq!(k, lease_key("ns", &entry, &[b"a".as_slice(), b"b"]));
        assert_ne!(k, lease_key("ns", &entry, &[b"a".as_slice(), b"c"]));
        assert_ne!(
            k,
            lease_key("ns", &entry, &[b"ab".as_slice()]),
            "stamps are delimited"
        );
        assert_ne!(
            k,
            lease_key("ns", &entry_key("ns", &[8; 32]), &[b"a".as_slice(), b"b"])
        );
        assert!(!is_entry_key(&k) && !is_sequence_key(&k));
    }

    #[test]
    fn tokens_are_random() {
        assert_ne!(new_token(), new_token());
        assert_eq!(new_token().len(), TOKEN_LEN);
    }
}
