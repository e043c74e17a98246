use cached_query::invalidates;
use sqlx::{Postgres, Transaction};

#[invalidates("user:<id>")]
async fn rename(tx: &mut Transaction<'_, Postgres>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET name = 'x' WHERE id = $1").bind(id).execute(&mut **tx).await?;
    Ok(())
}

fn main() {}
