//! The key space: every Redis key name the crate writes (entries, tags, the namespace
//! generation, sessions), all under `{namespace}:`, and the random version tokens of stamps.
//!
//! ```text
//! {ns}:g            namespace generation token (`clear()` replaces it)
//! {ns}:s            `run_id` of the Redis server the namespace was last made safe on
//! {ns}:s:{n}        the same, per Redis Cluster master (`n` picks a slot the node serves)
//! {ns}:t:{32 hex}   tag version token (first 16 bytes of sha256(tag))
//! {ns}:e:{64 hex}   cached entry (sha256 of the call's canonical key document)
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
    hashed_key(namespace, ":t:", &sha256(tag.as_bytes())[..16])
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
    fn entry_keys_are_told_from_stamp_keys() {
        for ns in ["ns", "a:e:b", ""] {
            assert!(is_entry_key(&entry_key(ns, &[0xAB; 32])));
            assert!(!is_entry_key(&tag_key(ns, "user:1")));
            assert!(!is_entry_key(&generation_key(ns)));
        }
        assert!(!is_entry_key("e:"));
    }

    #[test]
    fn tokens_are_random() {
        assert_ne!(new_token(), new_token());
        assert_eq!(new_token().len(), TOKEN_LEN);
    }
}
