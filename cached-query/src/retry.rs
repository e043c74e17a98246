//! Which database errors are worth running again: the connection or the pool failed, or the
//! server refused the statement for a reason that a new attempt can clear (a serialization
//! failure, a deadlock, a shutdown).

/// Whether `error` is *transient*: running the same statement again may succeed.
///
/// - I/O errors on the connection and `PoolTimedOut`;
/// - database errors whose SQLSTATE says so: `40001` serialization failure (also MySQL's
///   deadlock, 1213), `40P01` deadlock, `57P01`/`57P02`/`57P03` (the server is shutting down,
///   crashed, or not accepting connections yet), and class `08` (connection exceptions);
/// - with the `mysql` feature, MySQL/MariaDB errors 1213 (deadlock) and 1205 (lock wait
///   timeout), told by their error number.
///
/// Everything else is not: constraint violations (`23505`, MySQL 1062), syntax errors
/// (`42601`, MySQL 1064), `RowNotFound`, decoding and configuration errors. A statement that
/// failed inside a transaction cannot be retried alone (the transaction is aborted): retry the
/// whole transaction.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => transient_database_error(db.as_ref()),
        _ => false,
    }
}

fn transient_database_error(db: &dyn sqlx::error::DatabaseError) -> bool {
    #[cfg(feature = "mysql")]
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return matches!(my.number(), 1205 | 1213);
    }
    match db.code().as_deref() {
        Some("40001" | "40P01" | "57P01" | "57P02" | "57P03") => true,
        Some(code) => code.starts_with("08"),
        None => false,
    }
}
