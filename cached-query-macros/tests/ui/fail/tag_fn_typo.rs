cached_query::tags! {
    pub fn user(id: i64) = "user:{idd}";
}

fn main() {
    let _ = user(1);
}
