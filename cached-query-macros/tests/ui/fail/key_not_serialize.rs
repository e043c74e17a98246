use cached_query::cached_query;

struct Filter {
    name: String,
}

#[cached_query]
async fn search(filter: Filter) -> Result<Vec<String>, String> {
    Ok(vec![filter.name])
}

fn main() {}
