//! The bytes stored under an entry key: a small header (magic, format version, the tag
//! stamps seen before the query ran, and for entries with result tags those tags and their
//! stamps) followed by the serde_json payload.
//!
//! ```text
//! format 1: [0xC9][1][n][len0][stamp0]..[len(n-1)][stamp(n-1)][json payload…]
//! format 2: [0xC9][2][n][stamps as above][m][hash0 (16)][len][stamp]..[json payload…]
//! format 3, 4: [0xC9][3 or 4][fresh until: u64 BE, ms since the Unix epoch] then as 1, 2
//! format 5, 6: as 3, 4, the time only what `refresh_ahead` measures from (not enforced)
//! ```
//! Stamp 0 is the namespace generation, the others are the entry's tags in template order.
//! Format 2 adds `m` result tags (tags computed from the value, `<ret…>`), each named by its
//! [`tag_hash`](crate::keyspace::tag_hash) with the stamp it had when the value was stored.
//! Every entry of a site with result tags has format 2 (`m` may be 0: `None`, an empty
//! `Vec`), and such a site serves no format 1 entry: one stored before the site had result
//! tags, or by a process that does not know them, was never checked against them. Anything that does not parse, or has another
//! format version, is treated as a miss.

const MAGIC: u8 = 0xC9;
/// Bumped whenever the layout changes; older entries then read as misses and are overwritten.
pub(crate) const FORMAT_VERSION: u8 = 1;
/// The layout with result tags.
const FORMAT_WITH_RESULT_TAGS: u8 = 2;
/// Formats 1 and 2 with the time the entry stops being fresh (`stale_if_error`: the entry is
/// kept longer, as a value to fall back on when the query fails; `refresh_ahead`: a hit near
/// that time may refresh it).
const FORMAT_EXPIRING: u8 = 3;
const FORMAT_EXPIRING_WITH_RESULT_TAGS: u8 = 4;
/// Formats 3 and 4 whose time is not enforced (`refresh_ahead` without `stale_if_error`): Redis's
/// expiry ends such an entry, so clocks that disagree between hosts cannot end it early.
const FORMAT_REFRESHING: u8 = 5;
const FORMAT_REFRESHING_WITH_RESULT_TAGS: u8 = 6;

/// The time an entry stops being fresh, ms since the Unix epoch, as stored in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// Not served past it (`stale_if_error` keeps it longer, to fall back on).
    Enforced(u64),
    /// Only what `refresh_ahead` measures from; the entry's expiry in the store ends it.
    Advisory(u64),
}
/// Length of a result tag's name in an entry.
const HASH_LEN: usize = 16;

/// Whether `stamp` can be a stamp: 1 to 255 bytes. Stamps are read from Redis, so anything
/// may come back: an empty value (a key evicted between its creation and its read) or
/// garbage someone wrote. Such a stamp is never stored nor matched: the read is a miss.
pub(crate) fn valid_stamp(stamp: &[u8]) -> bool {
    (1..=255).contains(&stamp.len())
}

/// A result tag as stored in an entry: the tag's hash and its stamp at the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResultStamp<'a> {
    pub(crate) hash: &'a [u8],
    pub(crate) stamp: &'a [u8],
}

/// Encodes `payload` with the stamps the value was computed under, for a site with result
/// tags its result tags' stamps (format 2), and the time it stops being fresh (formats 3, 4
/// with `stale_if_error`, 5, 6 for `refresh_ahead` alone); `None` when a stamp is not
/// [valid](valid_stamp) or there are more than 255 of either kind (the value must not be
/// stored).
pub(crate) fn encode<S: AsRef<[u8]>>(
    stamps: &[S],
    result: Option<&[ResultStamp<'_>]>,
    fresh_until: Option<Until>,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let n = u8::try_from(stamps.len()).ok()?;
    let with_result = result.is_some();
    let result = result.unwrap_or_default();
    let m = u8::try_from(result.len()).ok()?;
    if !stamps.iter().all(|s| valid_stamp(s.as_ref()))
        || !result
            .iter()
            .all(|r| valid_stamp(r.stamp) && r.hash.len() == HASH_LEN)
    {
        return None;
    }
    let header: usize = 4
        + stamps.iter().map(|s| 1 + s.as_ref().len()).sum::<usize>()
        + result
            .iter()
            .map(|r| HASH_LEN + 1 + r.stamp.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(header + 8 + payload.len());
    out.push(MAGIC);
    out.push(match (with_result, fresh_until) {
        (false, None) => FORMAT_VERSION,
        (true, None) => FORMAT_WITH_RESULT_TAGS,
        (false, Some(Until::Enforced(_))) => FORMAT_EXPIRING,
        (true, Some(Until::Enforced(_))) => FORMAT_EXPIRING_WITH_RESULT_TAGS,
        (false, Some(Until::Advisory(_))) => FORMAT_REFRESHING,
        (true, Some(Until::Advisory(_))) => FORMAT_REFRESHING_WITH_RESULT_TAGS,
    });
    if let Some(Until::Enforced(until) | Until::Advisory(until)) = fresh_until {
        out.extend_from_slice(&until.to_be_bytes());
    }
    out.push(n);
    for s in stamps {
        let s = s.as_ref();
        out.push(s.len() as u8); // checked by valid_stamp
        out.extend_from_slice(s);
    }
    if with_result {
        out.push(m);
        for r in result {
            out.extend_from_slice(r.hash);
            out.push(r.stamp.len() as u8);
            out.extend_from_slice(r.stamp);
        }
    }
    out.extend_from_slice(payload);
    Some(out)
}

/// Why stored bytes were not usable.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// Well-formed and computed under exactly the current stamps: the payload, and (format
    /// 2) the result tags whose stamps must still be checked.
    Fresh(&'a [u8], Option<Vec<ResultStamp<'a>>>),
    /// Computed under exactly the current stamps, but past the time it stops being fresh
    /// (`stale_if_error`): not served, only fallen back on when the query fails.
    Expired(&'a [u8], Option<Vec<ResultStamp<'a>>>),
    /// Well-formed but computed under other stamps (an invalidation or `clear` happened since).
    Stale,
    /// Not an entry of this format: corrupt, truncated or written by another format version.
    Corrupt,
}

/// The payload of a well-formed entry that is not past its freshness, without checking its
/// stamps (for a near-cache entry whose stamps were checked and have not changed since).
pub(crate) fn payload(bytes: &[u8]) -> Option<&[u8]> {
    let parts = parse::<&[u8]>(bytes, &[])?;
    (!parts.expired()).then_some(parts.payload)
}

/// When an entry of format 3 to 6 stops being fresh (ms since the Unix epoch).
pub(crate) fn fresh_until(bytes: &[u8]) -> Option<u64> {
    match bytes {
        [
            MAGIC,
            FORMAT_EXPIRING..=FORMAT_REFRESHING_WITH_RESULT_TAGS,
            until @ ..,
        ] => Some(u64::from_be_bytes(until.get(..8)?.try_into().ok()?)),
        _ => None,
    }
}

/// Checks `bytes` against the current stamps: the payload and the result tags still to be
/// checked if they match.
pub(crate) fn decode<'a, S: AsRef<[u8]>>(bytes: &'a [u8], current: &[S]) -> Decoded<'a> {
    match parse(bytes, current) {
        None => Decoded::Corrupt,
        Some(parts) if !parts.fresh => Decoded::Stale,
        Some(parts) if parts.expired() => Decoded::Expired(parts.payload, parts.result),
        Some(parts) => Decoded::Fresh(parts.payload, parts.result),
    }
}

/// An entry's parts (see [`parse`]).
struct Parts<'a> {
    /// Its stamps are the current ones.
    fresh: bool,
    result: Option<Vec<ResultStamp<'a>>>,
    fresh_until: Option<u64>,
    payload: &'a [u8],
}

impl Parts<'_> {
    /// Past the time it stops being fresh (by this machine's clock).
    fn expired(&self) -> bool {
        self.fresh_until.is_some_and(|until| now_ms() > until)
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An entry's parts, its stamps compared with `current` while parsing (a hit allocates
/// nothing here). `None` when it is not an entry of this format.
fn parse<'a, S: AsRef<[u8]>>(bytes: &'a [u8], current: &[S]) -> Option<Parts<'a>> {
    let [magic, version, rest @ ..] = bytes else {
        return None;
    };
    let (with_result, expiring, enforced) = match *version {
        FORMAT_VERSION => (false, false, false),
        FORMAT_WITH_RESULT_TAGS => (true, false, false),
        FORMAT_EXPIRING => (false, true, true),
        FORMAT_EXPIRING_WITH_RESULT_TAGS => (true, true, true),
        FORMAT_REFRESHING => (false, true, false),
        FORMAT_REFRESHING_WITH_RESULT_TAGS => (true, true, false),
        _ => return None,
    };
    if *magic != MAGIC {
        return None;
    }
    let mut rest = rest;
    let fresh_until = if expiring {
        let until: [u8; 8] = take(&mut rest, 8)?.try_into().ok()?;
        Some(u64::from_be_bytes(until)).filter(|_| enforced)
    } else {
        None
    };
    let (n, tail) = rest.split_first()?;
    let mut rest = tail;
    let mut fresh = usize::from(*n) == current.len();
    for i in 0..usize::from(*n) {
        let stamp = take_stamp(&mut rest)?;
        // A current stamp that cannot be one matches nothing (an empty one must not equal an
        // entry stored under an empty stamp by an older version: "absent = version 0").
        fresh = fresh
            && current
                .get(i)
                .is_some_and(|c| valid_stamp(c.as_ref()) && c.as_ref() == stamp);
    }
    let result = if with_result {
        Some(result_stamps(&mut rest)?)
    } else {
        None
    };
    Some(Parts {
        fresh,
        result,
        fresh_until,
        payload: rest,
    })
}

/// Takes `len` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
    if rest.len() < len {
        return None;
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Some(head)
}

/// Takes one length-prefixed stamp off the front of `rest`.
fn take_stamp<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = take(rest, 1)?[0];
    take(rest, usize::from(len))
}

/// Takes the result tags of a format 2 entry off the front of `rest`.
fn result_stamps<'a>(rest: &mut &'a [u8]) -> Option<Vec<ResultStamp<'a>>> {
    let m = take(rest, 1)?[0];
    (0..m)
        .map(|_| {
            let hash = take(rest, HASH_LEN)?;
            let stamp = take_stamp(rest)?;
            Some(ResultStamp { hash, stamp })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamps() -> Vec<Vec<u8>> {
        vec![vec![1; 16], vec![2; 16]]
    }

    #[test]
    fn stamps_that_cannot_be_stamps_are_never_stored_nor_matched() {
        for bad in [vec![], vec![7u8; 256], vec![7u8; 1000]] {
            assert_eq!(
                encode(&[vec![1u8; 16], bad.clone()], None, None, b"1"),
                None
            );
            // An entry stored (by hand, or an older version) under that stamp is not fresh.
            let mut forged = vec![MAGIC, FORMAT_VERSION, 1, 0];
            forged.extend_from_slice(b"1");
            assert_ne!(
                decode(&forged, std::slice::from_ref(&bad)),
                Decoded::Fresh(b"1", None)
            );
        }
        let too_many: Vec<Vec<u8>> = (0..256).map(|_| vec![1u8; 16]).collect();
        assert_eq!(encode(&too_many, None, None, b"1"), None);
        assert!(encode(&[vec![1u8; 255]], None, None, b"1").is_some());
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&stamps(), None, None, b"{\"a\":1}").unwrap();
        assert_eq!(
            decode(&bytes, &stamps()),
            Decoded::Fresh(b"{\"a\":1}", None)
        );
        assert_eq!(payload(&bytes), Some(&b"{\"a\":1}"[..]));
        assert_eq!(payload(&bytes[..10]), None);
    }

    #[test]
    fn result_tags_round_trip_and_sites_without_them_keep_format_1() {
        let hash = [7u8; 16];
        let result = [ResultStamp {
            hash: &hash,
            stamp: b"token",
        }];
        let bytes = encode(&stamps(), Some(&result), None, b"[1]").unwrap();
        assert_eq!(bytes[1], FORMAT_WITH_RESULT_TAGS);
        assert_eq!(
            decode(&bytes, &stamps()),
            Decoded::Fresh(b"[1]", Some(result.to_vec()))
        );
        assert_eq!(payload(&bytes), Some(&b"[1]"[..]));
        // A site with result tags and a value that has none (`None`) still writes format 2.
        let empty = encode(&stamps(), Some(&[]), None, b"null").unwrap();
        assert_eq!(
            decode(&empty, &stamps()),
            Decoded::Fresh(b"null", Some(vec![]))
        );
        assert_eq!(
            encode(&stamps(), None, None, b"1").unwrap()[1],
            FORMAT_VERSION
        );
        for cut in 0..bytes.len() - 3 {
            assert!(payload(&bytes[..cut]).is_none_or(|p| p.len() < 3), "{cut}");
        }
        let bad = [ResultStamp {
            hash: &hash[..3],
            stamp: b"token",
        }];
        assert_eq!(encode(&stamps(), Some(&bad), None, b"1"), None);
    }

    #[test]
    fn an_expiring_entry_is_fresh_then_expired_never_stale_by_time() {
        let later = now_ms() + 60_000;
        let bytes = encode(&stamps(), None, Some(Until::Enforced(later)), b"7").unwrap();
        assert_eq!(bytes[1], FORMAT_EXPIRING);
        assert_eq!(decode(&bytes, &stamps()), Decoded::Fresh(b"7", None));
        assert_eq!(payload(&bytes), Some(&b"7"[..]));
        let past = encode(&stamps(), None, Some(Until::Enforced(now_ms() - 1)), b"7").unwrap();
        assert_eq!(decode(&past, &stamps()), Decoded::Expired(b"7", None));
        assert_eq!(
            payload(&past),
            None,
            "never served from the near cache once expired"
        );
        let mut other = stamps();
        other[0][0] = 0;
        assert_eq!(
            decode(&past, &other),
            Decoded::Stale,
            "invalidated: not even a fallback"
        );
        let hash = [3u8; 16];
        let result = [ResultStamp {
            hash: &hash,
            stamp: b"t",
        }];
        let tagged = encode(
            &stamps(),
            Some(&result),
            Some(Until::Enforced(later)),
            b"[]",
        )
        .unwrap();
        assert_eq!(tagged[1], FORMAT_EXPIRING_WITH_RESULT_TAGS);
        assert_eq!(
            decode(&tagged, &stamps()),
            Decoded::Fresh(b"[]", Some(result.to_vec()))
        );
        for cut in 0..10 {
            assert_eq!(decode(&bytes[..cut], &stamps()), Decoded::Corrupt, "{cut}");
        }
    }

    /// `refresh_ahead` alone: the time is kept (for `fresh_until`) but never ends freshness.
    #[test]
    fn an_advisory_time_is_read_but_not_enforced() {
        let past = now_ms() - 1;
        let bytes = encode(&stamps(), None, Some(Until::Advisory(past)), b"7").unwrap();
        assert_eq!(bytes[1], FORMAT_REFRESHING);
        assert_eq!(fresh_until(&bytes), Some(past));
        assert_eq!(decode(&bytes, &stamps()), Decoded::Fresh(b"7", None));
        assert_eq!(payload(&bytes), Some(&b"7"[..]));
        let enforced = encode(&stamps(), Some(&[]), Some(Until::Enforced(past)), b"7").unwrap();
        assert_eq!(fresh_until(&enforced), Some(past));
        let tagged = encode(&stamps(), Some(&[]), Some(Until::Advisory(past)), b"7").unwrap();
        assert_eq!(tagged[1], FORMAT_REFRESHING_WITH_RESULT_TAGS);
        assert_eq!(
            decode(&tagged, &stamps()),
            Decoded::Fresh(b"7", Some(vec![]))
        );
        assert_eq!(
            fresh_until(&encode(&stamps(), None, None, b"7").unwrap()),
            None
        );
        assert_eq!(fresh_until(&bytes[..5]), None);
    }

    #[test]
    fn other_stamps_are_stale() {
        let bytes = encode(&stamps(), None, None, b"1").unwrap();
        let mut now = stamps();
        now[1][0] = 9;
        assert_eq!(decode(&bytes, &now), Decoded::Stale);
        assert_eq!(decode(&bytes, &now[..1]), Decoded::Stale);
    }

    #[test]
    fn garbage_and_truncation_are_corrupt_never_panics() {
        let bytes = encode(&stamps(), None, None, b"1").unwrap();
        for cut in 0..bytes.len() - 1 {
            let d = decode(&bytes[..cut], &stamps());
            assert!(matches!(d, Decoded::Corrupt | Decoded::Fresh(..)), "{cut}");
        }
        assert_eq!(decode(b"hello world", &stamps()), Decoded::Corrupt);
        let mut old = bytes.clone();
        old[1] = 0;
        assert_eq!(decode(&old, &stamps()), Decoded::Corrupt);
    }
}

/// Cached bytes are untrusted input (anyone with Redis access can write them): a bounded,
/// deterministic fuzz run over the decoder, in the regular test suite.
#[cfg(test)]
mod fuzz {
    use super::*;

    /// xorshift64*: reproducible without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Typed {
        id: i64,
        name: String,
        tags: Vec<Option<u8>>,
    }

    #[test]
    fn decoding_garbage_never_panics() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let stamps = vec![vec![7u8; 16], vec![9u8; 16], vec![1u8; 3]];
        let valid = encode(
            &stamps,
            None,
            None,
            br#"{"id":1,"name":"x","tags":[1,null]}"#,
        )
        .unwrap();
        let (mut fresh, mut stale, mut corrupt) = (0, 0, 0);
        for round in 0..200_000 {
            let mut bytes = if round % 2 == 0 {
                valid.clone()
            } else {
                Vec::new()
            };
            match round % 4 {
                // flip, insert and delete bytes of a valid envelope
                0 => {
                    for _ in 0..=rng.below(4) {
                        let i = rng.below(bytes.len());
                        bytes[i] = rng.next() as u8;
                    }
                }
                2 => {
                    let i = rng.below(bytes.len());
                    if rng.below(2) == 0 {
                        bytes.insert(i, rng.next() as u8);
                    } else {
                        bytes.truncate(i);
                    }
                }
                // pure noise, often starting like an envelope
                _ => {
                    let len = rng.below(64);
                    bytes.extend((0..len).map(|_| rng.next() as u8));
                    if rng.below(2) == 0 && bytes.len() >= 2 {
                        bytes[0] = 0xC9;
                        bytes[1] = FORMAT_VERSION;
                    }
                }
            }
            match decode(&bytes, &stamps) {
                Decoded::Fresh(payload, _) | Decoded::Expired(payload, _) => {
                    fresh += 1;
                    let _ = serde_json::from_slice::<Typed>(payload);
                }
                Decoded::Stale => stale += 1,
                Decoded::Corrupt => corrupt += 1,
            }
        }
        // The run explored all three outcomes.
        assert!(
            fresh > 100 && stale > 100 && corrupt > 100,
            "{fresh} {stale} {corrupt}"
        );
    }
}
