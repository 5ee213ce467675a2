//! Operator commands: create the topics, generate a synthetic catalog.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use recpipe_shared::catalog::{generate, SyntheticCatalog};
use recpipe_shared::settings::Settings;

#[derive(Parser)]
#[command(name = "recpipe-admin", about = "recpipe operator commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Topic management.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Catalog management.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Creates the pipeline's topics that are missing (kafka.* settings).
    Create {
        /// Partitions per topic (default: kafka.partitions).
        #[arg(long)]
        partitions: Option<i32>,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Writes a synthetic catalog of clustered embeddings with readable names.
    Generate {
        /// Output directory (default: catalog.dir).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 2_000)]
        products: usize,
        #[arg(long, default_value_t = 32)]
        dim: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Overwrite an existing catalog.
        #[arg(long)]
        force: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load("admin")?;
    recpipe_shared::telemetry::init("recpipe-admin", &settings.telemetry);
    match cli.command {
        Command::Topics {
            command: TopicsCommand::Create { partitions },
        } => {
            let partitions = partitions.unwrap_or(settings.kafka.partitions);
            recpipe_shared::kafka::ensure_pipeline_topics(&settings.kafka, partitions)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot create topics on {}: {e} (is the broker running?)",
                        settings.kafka.brokers
                    )
                })?;
            println!(
                "topics ready on {}: {}",
                settings.kafka.brokers,
                settings.kafka.topics.all().join(", ")
            );
        }
        Command::Catalog {
            command:
                CatalogCommand::Generate {
                    out,
                    products,
                    dim,
                    seed,
                    force,
                },
        } => {
            let out = out.unwrap_or(settings.catalog.dir);
            if out.join(recpipe_shared::catalog::PRODUCTS_FILE).exists() && !force {
                println!(
                    "catalog already at {} (use --force to replace it)",
                    out.display()
                );
                return Ok(());
            }
            anyhow::ensure!(
                products > 0 && dim > 1,
                "--products must be > 0 and --dim > 1"
            );
            let catalog = generate(SyntheticCatalog {
                products,
                dim,
                seed,
                ..Default::default()
            });
            catalog.save(&out)?;
            println!(
                "wrote {products} products × {dim} dims to {}",
                out.display()
            );
        }
    }
    Ok(())
}
