//! Peer serving: node B fetches one blob from node A's daemon, as a peer does (mutual TLS with
//! a cluster leaf; then authenticated plaintext), against nginx on node A serving the same file
//! of the same content store over the same link. Runs alternate between the two, so both see
//! the same machine.

use std::time::SystemTime;

use anyhow::{Context as _, Result, ensure};
use http::Method;
use spegel::membership::{AUTH_HEADER, ClusterSecrets, PeerTls, PlaintextAuth};
use spegel_tests::{
    cluster,
    rig::{Endpoint, Rig, spegel::SpegelOptions},
};

use super::client::{self, Tls};
use super::nginx::{Nginx, TLS_NAME};
use super::{Row, sorted};

pub(crate) const IMAGE: &str = "micro-serving";
/// Measured transfers per server and transport (after one warm-up each). On a small shared
/// machine one transfer at GB/s varies by a third either way; fifteen give a steady median.
const RUNS: usize = 15;
const NGINX_PLAIN: u16 = 18080;
const NGINX_TLS: u16 = 18443;

/// Goodputs in MB/s (10^6 bytes), per run.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct ServingResult {
    pub(crate) blob_bytes: u64,
    pub(crate) peer_tls: Vec<f64>,
    pub(crate) nginx_tls: Vec<f64>,
    pub(crate) peer_plaintext: Vec<f64>,
    pub(crate) nginx_sendfile: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    super::percentile(&sorted(v.to_vec()), 0.5)
}

impl ServingResult {
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} MiB: peer TLS {:.0} MB/s vs nginx TLS {:.0} MB/s; peer plaintext {:.0} MB/s vs nginx sendfile {:.0} MB/s (medians)",
            self.blob_bytes >> 20,
            median(&self.peer_tls),
            median(&self.nginx_tls),
            median(&self.peer_plaintext),
            median(&self.nginx_sendfile)
        )
    }

    pub(crate) fn rows(&self) -> Vec<Row> {
        let row = |what: &str, ours: &[f64], theirs: &[f64], baseline: &str| {
            let ratio = median(ours) / median(theirs);
            Row {
                what: format!(
                    "{what}, {} MiB blob, median of {RUNS}",
                    self.blob_bytes >> 20
                ),
                measured: format!("{:.0} MB/s", median(ours)),
                baseline: format!("{:.0} MB/s ({baseline})", median(theirs)),
                ratio: Some(ratio),
                goal: "≥ 0.9× the baseline".into(),
                met: ratio >= 0.9,
            }
        };
        vec![
            row(
                "Peer serving, authenticated plaintext",
                &self.peer_plaintext,
                &self.nginx_sendfile,
                "nginx sendfile",
            ),
            row(
                "Peer serving, mutual TLS",
                &self.peer_tls,
                &self.nginx_tls,
                "nginx TLS 1.3",
            ),
        ]
    }
}

pub(crate) async fn run(rig: &Rig) -> Result<ServingResult> {
    let image = rig.image(IMAGE).context("serving image missing")?;
    let blob = image
        .layers()
        .first()
        .context("serving image without layers")?
        .clone();
    let server = rig.node(0);
    server.cri_pull(&image.reference(Endpoint::Tls)).await?;
    ensure!(
        server.has_blob(&blob.digest).await?,
        "the blob is not in node A's content store after its pull"
    );
    let hex = blob
        .digest
        .strip_prefix("sha256:")
        .context("blob digest is not sha256")?;

    let root = server.content_dir().join("blobs").join("sha256");
    let nginx = Nginx::start(
        rig,
        "nginx-serving",
        Some(server.netns()),
        server.ip(),
        &root,
        NGINX_PLAIN,
        Some(NGINX_TLS),
    )
    .await?;
    let result = measure(rig, &nginx, &image, &blob, hex).await;
    nginx.stop().await?;
    result
}

async fn measure(
    rig: &Rig,
    nginx: &Nginx,
    image: &spegel_tests::rig::TestImage,
    blob: &spegel_tests::rig::Blob,
    hex: &str,
) -> Result<ServingResult> {
    let client = rig.node(1);
    nginx.wait_listening(client).await?;
    let nginx_path = format!("/{hex}");
    let nginx_tls = Tls::with_ca(rig.ca().cert_path(), TLS_NAME)?;
    let nginx_tls_addr = nginx.tls.context("nginx without TLS")?;

    let secrets = ClusterSecrets::read(&[rig.cluster_secret_path()])?;
    let peer_tls = PeerTls::new(&secrets)?;
    let peer_tls = Tls {
        config: peer_tls.client_config(),
        name: peer_tls.server_name(None),
    };
    let plaintext = PlaintextAuth::new(&secrets);
    let reference = image.reference(Endpoint::Tls);
    let host = reference
        .split('/')
        .next()
        .context("reference without host")?;
    let peer_path = format!(
        "/v2/{}/blobs/{}?{}",
        image.repository,
        blob.digest,
        cluster::ns_query(host)
    );
    let mut result = ServingResult {
        blob_bytes: blob.size,
        ..ServingResult::default()
    };
    let options = || SpegelOptions::mirror().log("warn");

    // Mutual TLS (the default peer transport).
    let daemon = rig.start_spegel(0, options()).await?;
    let addr = daemon.registry_addr();
    for run in 0..=RUNS {
        let ours = || client::get_ok(client, addr, Some(&peer_tls), &peer_path, &[], blob.size);
        let theirs = || {
            client::get_ok(
                client,
                nginx_tls_addr,
                Some(&nginx_tls),
                &nginx_path,
                &[],
                blob.size,
            )
        };
        let (ours, theirs) = in_turn(run, ours, theirs).await?;
        if run > 0 {
            result.peer_tls.push(ours.bytes_per_sec() / 1e6);
            result.nginx_tls.push(theirs.bytes_per_sec() / 1e6);
        }
    }
    daemon.stop().await?;

    // Authenticated plaintext.
    let daemon = rig
        .start_spegel(0, options().arg("--peer-transport=plaintext"))
        .await?;
    let addr = daemon.registry_addr();
    for run in 0..=RUNS {
        let token = plaintext.sign_request(&Method::GET, &peer_path, SystemTime::now());
        let headers = [(AUTH_HEADER, token.to_str()?.to_owned())];
        let ours = || client::get_ok(client, addr, None, &peer_path, &headers, blob.size);
        let theirs = || client::get_ok(client, nginx.plain, None, &nginx_path, &[], blob.size);
        let (ours, theirs) = in_turn(run, ours, theirs).await?;
        if run > 0 {
            result.peer_plaintext.push(ours.bytes_per_sec() / 1e6);
            result.nginx_sendfile.push(theirs.bytes_per_sec() / 1e6);
        }
    }
    daemon.stop().await?;
    Ok(result)
}

/// `ours` and `theirs`, the first of them first on even runs: who goes first alternates, so
/// neither gains from the other's warm-up.
async fn in_turn<F, T>(run: usize, ours: impl Fn() -> F, theirs: impl Fn() -> F) -> Result<(T, T)>
where
    F: Future<Output = Result<T>>,
{
    if run.is_multiple_of(2) {
        let ours = ours().await?;
        Ok((ours, theirs().await?))
    } else {
        let theirs = theirs().await?;
        Ok((ours().await?, theirs))
    }
}
