//! `cargo xtask cluster-schema [--cluster NAME]`: prints the schema for a
//! sharded, replicated ClickHouse cluster, generated from compose/sql (see
//! docs/scaling.md).

use anyhow::{bail, Result};
use conformance::cluster::{cluster_schema_of_dir, ClusterOptions};
use conformance::paths;

pub fn run(args: &[String]) -> Result<()> {
    let cluster = match args {
        [] => "ci_telemetry".to_string(),
        [flag, name] if flag == "--cluster" => name.clone(),
        _ => bail!("usage: cargo xtask cluster-schema [--cluster NAME]"),
    };
    let statements = cluster_schema_of_dir(&paths::sql_dir(), &ClusterOptions::new(&cluster))?;
    println!("-- Generated from compose/sql by `cargo xtask cluster-schema --cluster {cluster}`.");
    println!(
        "-- Needs the {{shard}} and {{replica}} macros on every server and ClickHouse Keeper."
    );
    for statement in statements {
        println!("\n{statement};");
    }
    Ok(())
}
