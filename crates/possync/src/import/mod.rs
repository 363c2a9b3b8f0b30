//! `possync import`: brings another till application's database into a node, as ordinary
//! local changes that sync like anything else (see `docs/IMPORT.md`).
//!
//! The import writes the node's database directly, through the store's library API, in one
//! transaction: it refuses to run while the node of that data directory answers on its API
//! (two writers would interleave their changes' sequence numbers), and a dry run rehearses
//! the whole import and rolls it back.

pub mod posplus;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use possync_store::{DB_FILE, Store, SystemEnvironment};

use crate::load_config;

/// The page cache of the import's connection, KiB. Measured on the 100,000-product,
/// 200,000-ticket benchmark: 64 MB costs the same CPU as 1 GB (pages spilled to the WAL
/// before the commit are few) for a fifth of the memory (peak 164 MB against 784 MB);
/// 16 MB spills enough to cost about a fifth more.
const IMPORT_CACHE_KIB: u32 = 64 * 1024;

/// `possync import <SOURCE>`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub source: Source,
}

/// What to import from.
#[derive(Debug, Subcommand)]
pub enum Source {
    /// A POSPlus SQLite database (schema of POSPlus migrations 001-011).
    Posplus(PosplusArgs),
}

/// `possync import posplus`.
#[derive(Debug, Args)]
pub struct PosplusArgs {
    /// The POSPlus database file (posplus.db).
    #[arg(long)]
    pub from: PathBuf,
    /// The terminal's data directory (the node must not be running).
    #[arg(long, default_value = ".")]
    pub data_dir: PathBuf,
    /// Read and check everything, print the summary, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not import the products' stock (for a till whose catalog copy another till's
    /// import already brought with its stock).
    #[arg(long)]
    pub no_stock: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `possync import`.
pub fn run(args: &ImportArgs) -> Result<()> {
    match &args.source {
        Source::Posplus(args) => run_posplus(args),
    }
}

fn run_posplus(args: &PosplusArgs) -> Result<()> {
    let config = load_config(&args.data_dir)?;
    if crate::client::running_pos_id(&args.data_dir).as_deref() == Some(config.pos_id.as_str()) {
        bail!(
            "the node {} of {} is running (its API answers): stop it before importing, the import writes its database directly",
            config.pos_id,
            args.data_dir.display()
        );
    }
    // Checked before the node's database is opened: a file that is not a POSPlus database
    // changes nothing anywhere.
    let source = posplus::Source::open(&args.from)?;
    let db = args.data_dir.join(DB_FILE);
    let mut store = Store::open(&db, Box::new(SystemEnvironment::default()))
        .with_context(|| format!("cannot open the node's database {}", db.display()))?;
    // The import is one transaction of many savepoints.
    store.tune_for_long_transactions(IMPORT_CACHE_KIB)?;
    // Its changes are signed on a second thread while the next rows are written.
    store.sign_in_background(true)?;
    let options = posplus::Options { import_stock: !args.no_stock };
    let progress = posplus::Progress::new(std::io::stderr().is_terminal() && !args.json);
    let summary = if args.dry_run {
        store.rehearse(|store| posplus::import(store, &source, &options, &progress))?
    } else {
        store.all_or_nothing(|store| posplus::import(store, &source, &options, &progress))?
    };
    progress.finish();
    let mut summary = summary?;
    summary.dry_run = args.dry_run;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", summary.render());
    }
    Ok(())
}
