//! URL helpers that keep passwords out of messages, and put `REDIS_PASSWORD` where the
//! client reads it: the userinfo of `redis://`/`rediss://`, the `pass` query parameter of
//! `unix://` (redis-rs reads unix-socket credentials from the query).

/// Query parameters that carry a password (`pass`: redis-rs unix sockets; `password`:
/// libpq-style database URLs).
const SECRET_PARAMS: &[&str] = &["pass", "password"];

/// Splits `scheme://userinfo@rest` into its three parts (userinfo may be absent).
fn split_authority(url: &str) -> Option<(&str, Option<&str>, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => Some((scheme, Some(&rest[..at]), &rest[at + 1..])),
        None => Some((scheme, None, rest)),
    }
}

/// Whether `url` addresses a unix socket (`unix:`, `redis+unix:`…), whose credentials go in
/// the query.
fn is_unix(url: &str) -> bool {
    url.split_once(':').is_some_and(|(scheme, _)| {
        let scheme = scheme.to_ascii_lowercase();
        scheme == "unix" || scheme.ends_with("+unix")
    })
}

/// Where the fragment starts (or the end).
fn fragment_start(url: &str) -> usize {
    url.find('#').unwrap_or(url.len())
}

/// The `(start, end)` byte ranges of the values of query parameters named in `keys`.
fn query_values(url: &str, keys: &[&str]) -> Vec<(usize, usize)> {
    let end = fragment_start(url);
    let Some(q) = url[..end].find('?') else {
        return Vec::new();
    };
    let mut ranges = Vec::new();
    let mut at = q + 1;
    for pair in url[q + 1..end].split('&') {
        if let Some((key, value)) = pair.split_once('=')
            && keys.contains(&key)
            && !value.is_empty()
        {
            let start = at + key.len() + 1;
            ranges.push((start, start + value.len()));
        }
        at += pair.len() + 1;
    }
    ranges
}

/// The `(start, end)` byte ranges of the values of password query parameters.
fn secret_values(url: &str) -> Vec<(usize, usize)> {
    query_values(url, SECRET_PARAMS)
}

/// [`redact_url`] of each of `urls`.
pub(crate) fn redact_urls(urls: &[String]) -> Vec<String> {
    urls.iter().map(|u| redact_url(u)).collect()
}

/// The URL with its password (if any) replaced by `***`, safe for logs and errors: the
/// userinfo password and `pass=`/`password=` query values.
pub fn redact_url(url: &str) -> String {
    let mut out = match split_authority(url) {
        Some((scheme, Some(userinfo), rest)) if userinfo.contains(':') => {
            let user = userinfo.split_once(':').map_or("", |(user, _)| user);
            format!("{scheme}://{user}:***@{rest}")
        }
        Some(_) => url.to_owned(),
        // `unix:/path?pass=…` has no authority, and its secret is in the query.
        None if is_unix(url) => url.to_owned(),
        // Not a URL we understand: it might be a bare secret, show nothing of it.
        None => return "<unparseable URL>".to_owned(),
    };
    for (start, end) in secret_values(&out).into_iter().rev() {
        out.replace_range(start..end, "***");
    }
    out
}

/// Puts `password` into `url` unless the URL already carries one: in the userinfo, or for
/// `unix://` URLs as the `pass` query parameter.
pub(crate) fn inject_password(url: &str, password: &str) -> String {
    let encoded = percent_encode(password);
    if is_unix(url) {
        if !query_values(url, &["pass"]).is_empty() {
            return url.to_owned();
        }
        let (head, fragment) = url.split_at(fragment_start(url));
        let sep = if head.contains('?') { '&' } else { '?' };
        return format!("{head}{sep}pass={encoded}{fragment}");
    }
    match split_authority(url) {
        Some((scheme, None, rest)) => format!("{scheme}://:{encoded}@{rest}"),
        Some((scheme, Some(userinfo), rest)) if !userinfo.contains(':') => {
            format!("{scheme}://{userinfo}:{encoded}@{rest}")
        }
        _ => url.to_owned(),
    }
}

/// Replaces every password of `url` wherever it appears in `message`.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) fn scrub_password(message: &str, url: &str) -> String {
    let mut secrets: Vec<&str> = secret_values(url)
        .into_iter()
        .map(|(start, end)| &url[start..end])
        .collect();
    if let Some((_, password)) =
        split_authority(url).and_then(|(_, userinfo, _)| userinfo?.split_once(':'))
        && !password.is_empty()
    {
        secrets.push(password);
    }
    secrets
        .into_iter()
        .fold(message.to_owned(), |m, s| m.replace(s, "***"))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://:s3cret@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(redact_url("redis://u:s3cret@h"), "redis://u:***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("s3cret"), "<unparseable URL>");
        assert_eq!(
            redact_url("unix:///run/redis.sock?db=1&pass=s3cret"),
            "unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?password=s3cret#x"),
            "postgres://u@h/db?password=***#x"
        );
    }

    #[test]
    fn injects_password_only_when_absent() {
        assert_eq!(
            inject_password("redis://h:1/0", "p@ss"),
            "redis://:p%40ss@h:1/0"
        );
        assert_eq!(inject_password("redis://u@h", "p"), "redis://u:p@h");
        assert_eq!(inject_password("redis://u:q@h", "p"), "redis://u:q@h");
    }

    #[test]
    fn unix_socket_passwords_go_in_the_query_where_redis_rs_reads_them() {
        let url = inject_password("unix:///run/redis.sock", "p w+&");
        assert_eq!(url, "unix:///run/redis.sock?pass=p%20w%2B%26");
        assert_eq!(
            inject_password("unix:///run/redis.sock?db=2", "p"),
            "unix:///run/redis.sock?db=2&pass=p"
        );
        assert_eq!(
            inject_password("redis+unix:///s?pass=q", "p"),
            "redis+unix:///s?pass=q"
        );
        assert_eq!(inject_password("unix:///s#f", "p"), "unix:///s?pass=p#f");
        assert_eq!(
            inject_password("unix:///s?password=q", "p"),
            "unix:///s?password=q&pass=p",
            "redis-rs reads only `pass`"
        );
        assert_eq!(inject_password("unix:/s", "p"), "unix:/s?pass=p");
        assert_eq!(redact_url("unix:/s?pass=p"), "unix:/s?pass=***");
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
        assert_eq!(info.redis_settings().password(), Some("p w+&"));
        assert_eq!(redact_url(&url), "unix:///run/redis.sock?pass=***");
    }

    #[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
    #[test]
    fn scrubs_every_password_of_the_url() {
        let url = "postgres://u:one@h/db?password=two";
        assert_eq!(scrub_password("one two three", url), "*** *** three");
    }
}
