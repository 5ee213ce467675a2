//! A versioned model directory: what the services load as their catalog.
//! - `embeddings.npy`: float32, one row per product;
//! - `products.jsonl`: id, title, category, availability, in row order;
//! - `metadata.json`: version, method, parameters, training window, data checksum.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use recpipe_shared::catalog::{Catalog, Product, MODEL_METADATA_FILE};
use serde::{Deserialize, Serialize};

use crate::train::{TrainParams, TrainStats, Trained};
use crate::TrainerError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingWindow {
    pub from_ts: i64,
    pub to_ts: i64,
    pub events: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub version: String,
    pub method: String,
    pub params: TrainParams,
    pub stats: TrainStats,
    pub training_window: TrainingWindow,
    pub data_file: String,
    pub data_sha256: String,
    pub created_at: i64,
}

/// A version name that changes whenever the data or the parameters do.
pub fn version_name(data_sha256: &str, params: &TrainParams) -> String {
    use sha2::{Digest, Sha256};
    let params_hash = format!(
        "{:x}",
        Sha256::digest(serde_json::to_vec(params).unwrap_or_default())
    );
    format!("ppmi-svd-{}-{}", &data_sha256[..8], &params_hash[..8])
}

/// The catalog of a trained model: titles and categories where the data set has them.
pub fn catalog_of(
    trained: &Trained,
    titles: &HashMap<String, (String, String)>,
) -> Result<Catalog, TrainerError> {
    let products = trained
        .product_ids
        .iter()
        .map(|id| {
            let (title, category) = titles
                .get(id)
                .cloned()
                .unwrap_or_else(|| (id.clone(), String::new()));
            Product {
                product_id: id.clone(),
                title,
                category,
                available: true,
            }
        })
        .collect();
    Catalog::new(products, trained.embeddings.clone())
        .map_err(|e| TrainerError::Write(e.to_string()))
}

/// Writes `<out>/<version>/` and returns its path.
pub fn write(
    out: &Path,
    catalog: &Catalog,
    metadata: &ModelMetadata,
) -> Result<PathBuf, TrainerError> {
    let dir = out.join(&metadata.version);
    catalog
        .save(&dir)
        .map_err(|e| TrainerError::Write(e.to_string()))?;
    let json =
        serde_json::to_vec_pretty(metadata).map_err(|e| TrainerError::Write(e.to_string()))?;
    std::fs::write(dir.join(MODEL_METADATA_FILE), json)
        .map_err(|e| TrainerError::Write(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}
