//! The bytes stored under an entry key: a small header (magic, format version, the tag
//! stamps seen before the query ran, and for entries with result tags those tags and their
//! stamps) followed by the serde_json payload.
//!
//! ```text
//! format 1: [0xC9][1][n][len0][stamp0]..[len(n-1)][stamp(n-1)][json payload…]
//! format 2: [0xC9][2][n][stamps as above][m][hash0 (16)][len][stamp]..[json payload…]
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

/// Encodes `payload` with the stamps the value was computed under and, for a site with
/// result tags, its result tags' stamps (format 2); `None` when a stamp is not
/// [valid](valid_stamp) or there are more than 255 of either kind (the value must not be
/// stored).
pub(crate) fn encode<S: AsRef<[u8]>>(
    stamps: &[S],
    result: Option<&[ResultStamp<'_>]>,
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
    let mut out = Vec::with_capacity(header + payload.len());
    out.push(MAGIC);
    out.push(if with_result {
        FORMAT_WITH_RESULT_TAGS
    } else {
        FORMAT_VERSION
    });
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
    /// Well-formed but computed under other stamps (an invalidation or `clear` happened since).
    Stale,
    /// Not an entry of this format: corrupt, truncated or written by another format version.
    Corrupt,
}

/// The payload of a well-formed entry without checking its stamps (for a near-cache entry
/// whose stamps were checked and have not changed since).
pub(crate) fn payload(bytes: &[u8]) -> Option<&[u8]> {
    parse::<&[u8]>(bytes, &[]).map(|(_, _, payload)| payload)
}

/// Checks `bytes` against the current stamps: the payload and the result tags still to be
/// checked if they match.
pub(crate) fn decode<'a, S: AsRef<[u8]>>(bytes: &'a [u8], current: &[S]) -> Decoded<'a> {
    match parse(bytes, current) {
        None => Decoded::Corrupt,
        Some((true, result, payload)) => Decoded::Fresh(payload, result),
        Some((false, ..)) => Decoded::Stale,
    }
}

/// An entry's parts, its stamps compared with `current` while parsing (a hit allocates
/// nothing here): whether they all match, its result tags (format 2), its payload. `None`
/// when it is not an entry of this format.
#[allow(clippy::type_complexity)]
fn parse<'a, S: AsRef<[u8]>>(
    bytes: &'a [u8],
    current: &[S],
) -> Option<(bool, Option<Vec<ResultStamp<'a>>>, &'a [u8])> {
    let [magic, version, n, rest @ ..] = bytes else {
        return None;
    };
    if *magic != MAGIC || !(*version == FORMAT_VERSION || *version == FORMAT_WITH_RESULT_TAGS) {
        return None;
    }
    let mut rest = rest;
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
    let result = if *version == FORMAT_WITH_RESULT_TAGS {
        Some(result_stamps(&mut rest)?)
    } else {
        None
    };
    Some((fresh, result, rest))
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
            assert_eq!(encode(&[vec![1u8; 16], bad.clone()], None, b"1"), None);
            // An entry stored (by hand, or an older version) under that stamp is not fresh.
            let mut forged = vec![MAGIC, FORMAT_VERSION, 1, 0];
            forged.extend_from_slice(b"1");
            assert_ne!(
                decode(&forged, std::slice::from_ref(&bad)),
                Decoded::Fresh(b"1", None)
            );
        }
        let too_many: Vec<Vec<u8>> = (0..256).map(|_| vec![1u8; 16]).collect();
        assert_eq!(encode(&too_many, None, b"1"), None);
        assert!(encode(&[vec![1u8; 255]], None, b"1").is_some());
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&stamps(), None, b"{\"a\":1}").unwrap();
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
        let bytes = encode(&stamps(), Some(&result), b"[1]").unwrap();
        assert_eq!(bytes[1], FORMAT_WITH_RESULT_TAGS);
        assert_eq!(
            decode(&bytes, &stamps()),
            Decoded::Fresh(b"[1]", Some(result.to_vec()))
        );
        assert_eq!(payload(&bytes), Some(&b"[1]"[..]));
        // A site with result tags and a value that has none (`None`) still writes format 2.
        let empty = encode(&stamps(), Some(&[]), b"null").unwrap();
        assert_eq!(
            decode(&empty, &stamps()),
            Decoded::Fresh(b"null", Some(vec![]))
        );
        assert_eq!(encode(&stamps(), None, b"1").unwrap()[1], FORMAT_VERSION);
        for cut in 0..bytes.len() - 3 {
            assert!(payload(&bytes[..cut]).is_none_or(|p| p.len() < 3), "{cut}");
        }
        let bad = [ResultStamp {
            hash: &hash[..3],
            stamp: b"token",
        }];
        assert_eq!(encode(&stamps(), Some(&bad), b"1"), None);
    }

    #[test]
    fn other_stamps_are_stale() {
        let bytes = encode(&stamps(), None, b"1").unwrap();
        let mut now = stamps();
        now[1][0] = 9;
        assert_eq!(decode(&bytes, &now), Decoded::Stale);
        assert_eq!(decode(&bytes, &now[..1]), Decoded::Stale);
    }

    #[test]
    fn garbage_and_truncation_are_corrupt_never_panics() {
        let bytes = encode(&stamps(), None, b"1").unwrap();
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
        let valid = encode(&stamps, None, br#"{"id":1,"name":"x","tags":[1,null]}"#).unwrap();
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
                Decoded::Fresh(payload, _) => {
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
