compile_error!("klarify-sync has no MySQL support: enabling sqlx's `mysql` feature needs the real sqlx-mysql (remove the [patch] in Cargo.toml)");
