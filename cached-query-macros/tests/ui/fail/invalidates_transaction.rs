use cached_query::invalidates;
use sqlx::{Postgres, Transaction};

#[invalidates("user:<id>")]
async fn rename(tx: Transaction<'_, Postgres>, id: i64) -> Result<(), sqlx::Error> {
    let _ = id;
    tx.commit().await
}

fn main() {}
