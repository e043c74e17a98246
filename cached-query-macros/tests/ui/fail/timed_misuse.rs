use cached_query::timed;

#[timed(treshold_ms = 5)]
fn unknown_key() {}

#[timed(threshold_ms = "x")]
fn not_a_number() {}

#[timed(threshold_ms = -5)]
fn negative() {}

#[timed(threshold_ms = 5, threshold_ms = 6)]
fn duplicate() {}

#[timed(level = "loud")]
fn bad_level() {}

#[timed(name = "")]
fn empty_name() {}

fn main() {}
