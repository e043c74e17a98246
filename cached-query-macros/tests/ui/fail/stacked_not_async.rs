use cached_query::{cached_query, timed};

// Stacked either way, the error is reported once.

#[cached_query(ttl = 60)]
#[timed]
fn timed_inside(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[timed]
#[cached_query(ttl = 60)]
fn timed_outside(id: i64) -> Result<i64, String> {
    Ok(id)
}

fn main() {}
