//! Parsing environment variables (or any lookup function): blank means unset, and a bad
//! value is an error naming the variable, the value and what would be accepted.

use crate::Error;
use std::time::Duration;

/// `lookup(name)`, with empty or blank values treated as unset.
pub(crate) fn non_empty(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    lookup(name).filter(|v| !v.trim().is_empty())
}

/// Parses a boolean the way people write them in environment files.
pub(crate) fn parse_bool(name: &str, value: &str) -> Result<bool, Error> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::config(
            name,
            value,
            "true or false (also 1/0, yes/no, on/off)",
        )),
    }
}

/// Parses a whole number that must be at least `min`.
pub(crate) fn parse_u64(name: &str, value: &str, min: u64) -> Result<u64, Error> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n >= min)
        .ok_or_else(|| Error::config(name, value, &format!("a whole number ≥ {min}")))
}

/// Parses a whole number of milliseconds, at least 1.
pub(crate) fn parse_millis(name: &str, value: &str) -> Result<Duration, Error> {
    Ok(Duration::from_millis(parse_u64(name, value, 1)?))
}

/// Parses a whole number of seconds, at least 1.
pub(crate) fn parse_secs(name: &str, value: &str) -> Result<Duration, Error> {
    Ok(Duration::from_secs(parse_u64(name, value, 1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_numbers_name_the_variable_and_value() {
        let e = parse_u64("CACHE_DEFAULT_TTL", "abc", 1)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "CACHE_DEFAULT_TTL=\"abc\": expected a whole number ≥ 1");
        assert!(parse_u64("X", "0", 1).is_err());
        assert!(parse_u64("X", "-5", 1).is_err());
        assert!(parse_bool("CACHE_ENABLED", "maybe").is_err());
        assert!(!parse_bool("CACHE_ENABLED", "FALSE").unwrap());
    }
}
