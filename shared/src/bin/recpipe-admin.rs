//! Operator commands: create the topics, generate a synthetic catalog, publish models.

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
    /// Which models are served (hot swap, side-by-side versions, rollback).
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Publishes a model assignment on the models topic: every service loads it in the
    /// background and switches atomically. Rolling back is publishing the old one again.
    Publish {
        /// VERSION=DIR[:SHARE], one per variant (shares default to an equal split and
        /// must add up to 1), e.g. `ml-1121=models/ml-1121` or `a=models/a:0.9 b=models/b:0.1`.
        #[arg(required = true)]
        variants: Vec<String>,
    },
    /// Prints the assignment that is served (the latest published, else the configured one).
    Show,
}

/// `VERSION=DIR[:SHARE]`.
fn parse_variant(spec: &str) -> anyhow::Result<(String, PathBuf, Option<f64>)> {
    let (version, rest) = spec
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("{spec:?} is not VERSION=DIR[:SHARE]"))?;
    let (dir, share) = match rest.rsplit_once(':') {
        Some((dir, share)) => match share.parse::<f64>() {
            Ok(s) => (dir, Some(s)),
            Err(_) => (rest, None),
        },
        None => (rest, None),
    };
    Ok((version.to_string(), PathBuf::from(dir), share))
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
    /// Builds a model's HNSW graph and saves it beside the catalog (`hnsw-graph.bin`), so
    /// that gen-recommendations reads it at start instead of building it (which takes
    /// seconds to minutes at tens of thousands of products). Settings: model.hnsw.*.
    Index {
        /// The model directory (default: catalog.dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Writes a second model over the same products with blurred embeddings (a weaker
    /// model, to try experiments, swaps and rollbacks with).
    Blur {
        /// The model to start from (default: catalog.dir).
        #[arg(long)]
        from: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Norm of the noise added to each unit embedding.
        #[arg(long, default_value_t = 1.0)]
        noise: f32,
        /// The version its lists will name.
        #[arg(long)]
        version: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load("admin")?;
    recpipe_shared::telemetry::init("recpipe-admin", &settings.telemetry);
    match cli.command {
        Command::Models {
            command: ModelsCommand::Publish { variants },
        } => publish_models(&settings, &variants).await?,
        Command::Models {
            command: ModelsCommand::Show,
        } => {
            let registry = recpipe_shared::kafka::models::start_registry(
                &settings,
                recpipe_shared::model::IndexKind::None,
                tokio_util::sync::CancellationToken::new(),
            )
            .await?;
            let serving = registry.current();
            for m in &serving.models {
                println!(
                    "{:<24} {:>5.1}%  {} ({} products × {} dims, {})",
                    m.version,
                    m.share * 100.0,
                    m.path.display(),
                    m.catalog().len(),
                    m.catalog().dim(),
                    m.catalog().embeddings_id()
                );
            }
            return Ok(());
        }
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
            command: CatalogCommand::Index { dir },
        } => {
            use recpipe_shared::model::recommender::{
                build_graph, graph_key, save_graph, HNSW_GRAPH_FILE,
            };
            let dir = dir.unwrap_or(settings.catalog.dir);
            let catalog = recpipe_shared::catalog::Catalog::load(&dir)?;
            let hnsw = &settings.model.hnsw;
            anyhow::ensure!(
                catalog.len() >= hnsw.exact_below,
                "{} products: below model.hnsw.exact_below ({}), so this model is searched \
                 exactly and needs no graph",
                catalog.len(),
                hnsw.exact_below
            );
            eprintln!(
                "building the HNSW graph of {} products × {} dims (M {}, ef_construction {})...",
                catalog.len(),
                catalog.dim(),
                hnsw.max_connections,
                hnsw.ef_construction
            );
            let started = std::time::Instant::now();
            let graph = build_graph(&catalog, hnsw);
            let built = started.elapsed().as_secs_f64();
            let path = dir.join(HNSW_GRAPH_FILE);
            save_graph(&graph, &graph_key(&catalog, hnsw), &path)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            println!("built in {built:.1} s, saved to {}", path.display());
            // The ef_search for `model.hnsw.recall_target`, kept beside the graph for the
            // services that run with `ef_search: 0` (the default).
            let auto = recpipe_shared::settings::HnswSettings {
                ef_search: 0,
                ..hnsw.clone()
            };
            let started = std::time::Instant::now();
            let calibrated = recpipe_shared::model::Recommender::with_graph_file(
                std::sync::Arc::new(catalog),
                &auto,
                &dir,
            );
            let seconds = started.elapsed().as_secs_f64();
            let saved_to = dir.join(recpipe_shared::model::recommender::CALIBRATION_FILE);
            match calibrated.calibration() {
                Some(found) if found.recall >= hnsw.recall_target => println!(
                    "ef_search {} finds recall@10 {:.3} on this graph, target {} (calibrated in {seconds:.1} s, saved to {})",
                    found.ef_search,
                    found.recall,
                    hnsw.recall_target,
                    saved_to.display()
                ),
                Some(found) => println!(
                    "no ef_search tried reaches recall@10 {} on this graph (the largest finds {:.3}): \
                     the services will search at {}, which finds {:.3} (calibrated in {seconds:.1} s, saved to {}). \
                     Build with more model.hnsw.max_connections or ef_construction, or lower recall_target",
                    hnsw.recall_target,
                    found.best_recall,
                    found.ef_search,
                    found.recall,
                    saved_to.display()
                ),
                None => println!("ef_search {} (not calibrated)", calibrated.ef_search()),
            }
        }
        Command::Catalog {
            command:
                CatalogCommand::Blur {
                    from,
                    out,
                    noise,
                    version,
                    seed,
                },
        } => {
            let from = from.unwrap_or(settings.catalog.dir);
            let catalog = recpipe_shared::catalog::Catalog::load(&from)?;
            catalog.with_noise(noise, seed).save(&out)?;
            recpipe_shared::catalog::Catalog::save_version(&out, &version)?;
            println!(
                "wrote {version}: {} products from {} with noise {noise} to {}",
                catalog.len(),
                from.display(),
                out.display()
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

/// Checks that every model directory loads here before anything is published, so a typo
/// is caught at the operator's prompt rather than in the services' logs.
async fn publish_models(settings: &Settings, specs: &[String]) -> anyhow::Result<()> {
    let parsed = specs
        .iter()
        .map(|s| parse_variant(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let given: Vec<f64> = parsed.iter().filter_map(|(_, _, s)| *s).collect();
    let unset = parsed.len() - given.len();
    let rest = (1.0 - given.iter().sum::<f64>()).max(0.0);
    let mut variants = Vec::new();
    for (version, dir, share) in parsed {
        let dir = dir
            .canonicalize()
            .map_err(|e| anyhow::anyhow!("model directory {}: {e}", dir.display()))?;
        let catalog = recpipe_shared::catalog::Catalog::load(&dir)
            .map_err(|e| anyhow::anyhow!("model {version:?}: {e}"))?;
        println!(
            "{version}: {} products × {} dims from {}",
            catalog.len(),
            catalog.dim(),
            dir.display()
        );
        variants.push(recpipe_shared::events::ModelVariant {
            version,
            path: dir.to_string_lossy().into_owned(),
            share: share.unwrap_or(rest / unset.max(1) as f64),
        });
    }
    let assignment = recpipe_shared::events::ModelAssignment {
        variants,
        published_at: recpipe_shared::events::now_ms(),
    };
    recpipe_shared::kafka::models::publish(&settings.kafka, &assignment).await?;
    println!(
        "published to {:?} on {}: the services switch once their copies are built",
        settings.kafka.topics.models, settings.kafka.brokers
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_specs_parse() {
        assert_eq!(
            parse_variant("a=models/a:0.25").unwrap(),
            ("a".into(), PathBuf::from("models/a"), Some(0.25))
        );
        assert_eq!(
            parse_variant("b=/m/b").unwrap(),
            ("b".into(), PathBuf::from("/m/b"), None)
        );
        assert_eq!(
            parse_variant("c=C:dir").unwrap(),
            ("c".into(), PathBuf::from("C:dir"), None)
        );
        assert!(parse_variant("models/a").is_err());
    }
}
