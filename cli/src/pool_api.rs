//! The CLI through a pool member's Pool API: for renters without a cluster.
//! Each request is signed with the renter's wallet; the member places the
//! job in the pool and pays its lease from the renter's escrow account (after
//! `gpupool escrow agent --agent <the member's agent>`).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::StreamExt as _;
use gpupool_chain::Wallet;
use gpupool_crds::AiJobPhase;
use gpupool_crds::market_view::Offer;
use gpupool_crds::price::shown;
use gpupool_proto::pool::v1 as api;
use gpupool_proto::pool::v1::pool_client::PoolClient;
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::dash;
use crate::output::{Format, structured, table};
use crate::submit::{self, EXIT_TIMED_OUT, WaitEnded, WaitFor};

pub struct Pool {
    client: PoolClient<Channel>,
    wallet: Option<Wallet>,
    url: String,
}

/// A refusal from the member, as the sentence it carries.
fn refused(e: tonic::Status) -> anyhow::Error {
    match e.code() {
        tonic::Code::Unavailable if e.message().is_empty() => anyhow::anyhow!("the Pool API is unreachable"),
        _ => anyhow::anyhow!("{}", e.message()),
    }
}

impl Pool {
    /// Connects to `url`; an https URL is verified against `ca` (PEM) when
    /// given, else against the system's trusted roots.
    pub async fn connect(url: &str, wallet: Option<Wallet>, ca: Option<&Path>) -> anyhow::Result<Self> {
        let mut endpoint = Channel::from_shared(url.to_string()).with_context(|| format!("{url:?} is not a URL"))?;
        if url.starts_with("https://") {
            let tls = match ca {
                Some(path) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
                    std::fs::read(path).with_context(|| format!("reading --pool-api-ca {}", path.display()))?,
                )),
                None => ClientTlsConfig::new().with_native_roots(),
            };
            endpoint = endpoint.tls_config(tls).context("setting up TLS for the Pool API")?;
        } else if ca.is_some() {
            anyhow::bail!("--pool-api-ca is for an https:// Pool API; {url} is not one");
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the Pool API at {url}"))?;
        let client = PoolClient::new(channel);
        Ok(Self {
            client,
            wallet,
            url: url.to_string(),
        })
    }

    /// `msg` with the headers that sign it for `method`.
    fn signed<T: Message>(&self, method: &str, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let wallet = self.wallet.as_ref().context(
            "pass --wallet-key-file (or GPUPOOL_WALLET_KEY_FILE): Pool API requests are signed with your wallet",
        )?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let path = format!("/{}/{method}", gpupool_proto::pool::v1::pool_server::SERVICE_NAME);
        let h = wallet.sign_request(&path, &msg.encode_to_vec(), now, rand::random());
        let mut req = tonic::Request::new(msg);
        let md = req.metadata_mut();
        for (k, v) in h.pairs() {
            md.insert(k, v.parse().context("a signature header is not ASCII")?);
        }
        Ok(req)
    }

    pub async fn info(&mut self, format: Format) -> anyhow::Result<String> {
        let i = self
            .client
            .info(api::InfoRequest {})
            .await
            .map_err(refused)?
            .into_inner();
        if !matches!(format, Format::Table) {
            return structured(format, &i);
        }
        Ok(format!(
            "Pool API {} is {}'s operator.\nApprove its agent before submitting: gpupool escrow agent --agent {} --amount N\n{}",
            self.url,
            i.org,
            i.agent,
            table(
                &["ORG", "AGENT", "CHAIN-ID", "ESCROW", "TOKEN"],
                &[vec![
                    i.org.clone(),
                    i.agent.clone(),
                    i.chain_id.to_string(),
                    i.escrow,
                    i.token
                ]]
            )
        ))
    }

    pub async fn market(&mut self, format: Format) -> anyhow::Result<String> {
        let offers = self
            .client
            .market(api::MarketRequest {})
            .await
            .map_err(refused)?
            .into_inner()
            .offers;
        let offers: Vec<Offer> = offers
            .into_iter()
            .map(|o| Offer {
                org: o.org,
                gpu_product: o.gpu_product,
                memory_mib: o.memory_mib,
                free: i32::try_from(o.free_gpus).unwrap_or(i32::MAX),
                max_per_node: i32::try_from(o.gpus_per_node).unwrap_or(i32::MAX),
                price_per_gpu_hour: o.price_per_gpu_hour,
                connected: o.connected,
            })
            .collect();
        crate::market::render_offers(format, &offers)
    }

    /// Submits the job the flags (or file) describe; returns its name and what to say.
    pub async fn submit(&mut self, flags: &submit::JobFlags) -> anyhow::Result<(String, String)> {
        let job = submit::job_from(flags)?;
        let name = job.metadata.name.clone().context("the AiJob has no name")?;
        let spec_json = serde_json::to_string(&job.spec)?;
        let req = self.signed(
            "Submit",
            api::SubmitRequest {
                name: name.clone(),
                spec_json,
            },
        )?;
        let j = self.client.submit(req).await.map_err(refused)?.into_inner();
        Ok((
            name,
            format!(
                "aijob/{} submitted through {}: it runs in another organisation, paid from your escrow account\n",
                j.name, self.url
            ),
        ))
    }

    pub async fn jobs(&mut self, format: Format) -> anyhow::Result<String> {
        let req = self.signed("ListJobs", api::ListJobsRequest {})?;
        let jobs = self.client.list_jobs(req).await.map_err(refused)?.into_inner().jobs;
        if !matches!(format, Format::Table) {
            return structured(format, &jobs);
        }
        let rows = jobs
            .iter()
            .map(|j| {
                vec![
                    j.name.clone(),
                    dash(Some(j.phase.clone())),
                    dash(Some(j.runs_on_org.clone())),
                    j.max_price_per_gpu_hour.clone(),
                    dash(Some(shown(&j.cost_so_far))),
                    dash(Some(j.message.clone())),
                ]
            })
            .collect::<Vec<_>>();
        Ok(table(
            &["NAME", "PHASE", "RUNS-ON", "MAX-PRICE", "COST", "REASON"],
            &rows,
        ))
    }

    pub async fn bids(&mut self, format: Format, job: &str) -> anyhow::Result<String> {
        let req = self.signed("ListBids", api::JobRef { name: job.into() })?;
        let bids = self.client.list_bids(req).await.map_err(refused)?.into_inner().bids;
        if !matches!(format, Format::Table) {
            return structured(format, &bids);
        }
        let rows = bids
            .iter()
            .map(|b| {
                vec![
                    b.name.clone(),
                    b.provider_org.clone(),
                    b.gpu_product.clone(),
                    b.gpu_count.to_string(),
                    b.price_per_gpu_hour.clone(),
                    b.expires_at.clone(),
                    b.state.clone(),
                ]
            })
            .collect::<Vec<_>>();
        Ok(table(
            &["NAME", "PROVIDER", "PRODUCT", "GPUS", "PRICE/GPU-H", "EXPIRES", "STATE"],
            &rows,
        ))
    }

    pub async fn accept(&mut self, bid: &str) -> anyhow::Result<(String, String)> {
        let req = self.signed("AcceptBid", api::AcceptBidRequest { bid: bid.into() })?;
        let j = self.client.accept_bid(req).await.map_err(refused)?.into_inner();
        Ok((j.name.clone(), format!("accepted bid {bid} for aijob/{}\n", j.name)))
    }

    pub async fn raise(&mut self, job: &str, to: &str) -> anyhow::Result<String> {
        let req = self.signed(
            "RaiseBid",
            api::RaiseBidRequest {
                name: job.into(),
                max_price_per_gpu_hour: to.into(),
            },
        )?;
        let j = self.client.raise_bid(req).await.map_err(refused)?.into_inner();
        Ok(format!(
            "aijob/{} now pays at most {} per GPU-hour; its next order carries the new price\n",
            j.name, j.max_price_per_gpu_hour
        ))
    }

    pub async fn cancel(&mut self, job: &str) -> anyhow::Result<String> {
        let req = self.signed("Cancel", api::JobRef { name: job.into() })?;
        let j = self.client.cancel(req).await.map_err(refused)?.into_inner();
        Ok(format!(
            "aijob/{} cancelled: its lease closes on chain and the unused deposit returns to your escrow account\n",
            j.name
        ))
    }

    /// Your leases through this member, newest first.
    pub async fn leases(&mut self, format: Format) -> anyhow::Result<String> {
        let req = self.signed("ListLeases", api::ListLeasesRequest {})?;
        let leases = self.client.list_leases(req).await.map_err(refused)?.into_inner().leases;
        if !matches!(format, Format::Table) {
            return structured(format, &leases);
        }
        let rows = leases
            .iter()
            .map(|l| {
                vec![
                    l.name.clone(),
                    l.job.clone(),
                    l.provider_org.clone(),
                    format!("{}×{}", l.gpu_count, l.gpu_product),
                    lease_state(l),
                    dash(Some(shown(&l.deposited))),
                    dash(Some(shown(&l.paid))),
                    dash(Some(shown(&l.refunded))),
                    dash(Some(l.message.clone())),
                ]
            })
            .collect::<Vec<_>>();
        Ok(table(
            &[
                "NAME",
                "JOB",
                "PROVIDER",
                "GPUS",
                "STATE",
                "DEPOSITED",
                "PAID",
                "REFUNDED",
                "NOTE",
            ],
            &rows,
        ))
    }

    /// Follows one lease, printing each change to stderr, until it closes
    /// (or `timeout` runs out); says how it closed.
    pub async fn watch_lease(&mut self, name: &str, timeout: Option<Duration>) -> anyhow::Result<String> {
        let start = Instant::now();
        let mut last: Option<api::LeaseView> = None;
        let watched = async {
            loop {
                let req = self.signed("WatchLease", api::LeaseRef { name: name.into() })?;
                let stream = self.client.watch_lease(req).await.map_err(refused)?.into_inner();
                let closed = |l: &api::LeaseView| (l.state == "Closed").then(|| l.clone());
                if let Some(l) = follow(stream, start, &mut last, lease_progress, closed).await {
                    return Ok::<_, anyhow::Error>(l);
                }
                // The member dropped the stream, or the record went: look again.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        let closed = match timeout {
            Some(t) => tokio::time::timeout(t, watched).await.map_err(|_| {
                anyhow::Error::from(WaitEnded {
                    code: EXIT_TIMED_OUT,
                    message: format!(
                        "timed out after {}s waiting for lease {name} to close; last seen {}",
                        t.as_secs(),
                        last.as_ref().map_or_else(|| "nothing".into(), lease_progress)
                    ),
                })
            })??,
            None => watched.await?,
        };
        Ok(format!(
            "lease {} {}: paid {}, refunded {} of {} deposited\n",
            closed.name,
            lease_state(&closed),
            dash(Some(shown(&closed.paid))),
            dash(Some(shown(&closed.refunded))),
            dash(Some(shown(&closed.deposited)))
        ))
    }

    /// Your tokens as the member reads them from the chain.
    pub async fn escrow(&mut self, format: Format) -> anyhow::Result<String> {
        let req = self.signed("Escrow", api::EscrowRequest {})?;
        let e = self.client.escrow(req).await.map_err(refused)?.into_inner();
        if !matches!(format, Format::Table) {
            return structured(format, &e);
        }
        Ok(table(
            &[
                "ADDRESS",
                "WALLET",
                "ACCOUNT",
                "AGENT-MAY-COMMIT",
                "IN-LEASES",
                "OPEN-LEASES",
            ],
            &[vec![
                e.wallet,
                shown(&e.wallet_balance),
                shown(&e.account),
                shown(&e.agent_allowance),
                shown(&e.in_leases),
                e.open_leases.to_string(),
            ]],
        ))
    }

    /// Follows the job, printing each change to stderr, until it gets where
    /// `want` asks, fails, or `timeout` runs out. A watch the member
    /// interrupts is opened again.
    pub async fn wait(&mut self, name: &str, want: WaitFor, timeout: Duration) -> anyhow::Result<String> {
        let start = Instant::now();
        let mut last: Option<api::Job> = None;
        let watched = tokio::time::timeout(timeout, async {
            loop {
                let req = self.signed("WatchJob", api::JobRef { name: name.into() })?;
                let stream = self.client.watch_job(req).await.map_err(refused)?.into_inner();
                let there = |j: &api::Job| submit::reached(want, phase(&j.phase)).map(|code| (code, j.clone()));
                if let Some(got) = follow(stream, start, &mut last, progress, there).await {
                    return Ok::<_, anyhow::Error>(got);
                }
                // Ended without the job getting there: gone, or interrupted.
                if last.as_ref().is_some_and(|j| j.deleting) {
                    anyhow::bail!("aijob/{name} was cancelled");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
        .await;
        match watched {
            Ok(Ok((0, j))) => Ok(summary(&j)),
            Ok(Ok((code, j))) => Err(WaitEnded {
                code,
                message: format!("aijob/{name} failed: {}", summary(&j).trim_end()),
            }
            .into()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(WaitEnded {
                code: EXIT_TIMED_OUT,
                message: format!(
                    "timed out after {}s waiting for aijob/{name} to be {want:?}; last seen {}",
                    timeout.as_secs(),
                    last.as_ref()
                        .map_or_else(|| "nothing".into(), |j| summary(j).trim_end().to_string())
                ),
            }
            .into()),
        }
    }
}

/// Reads a watch stream until it ends or breaks, printing each change (as
/// `line` shows it) to stderr with the seconds since `start`; returns what
/// `done` makes of the first item it accepts. `last` keeps the latest item
/// across streams, so a watch opened again prints only what is new.
async fn follow<T: Clone, R>(
    mut stream: tonic::Streaming<T>,
    start: Instant,
    last: &mut Option<T>,
    line: fn(&T) -> String,
    done: impl Fn(&T) -> Option<R>,
) -> Option<R> {
    while let Some(item) = stream.next().await {
        let t = match item {
            Ok(t) => t,
            Err(e) => {
                eprintln!("[{:>6.1}s] {}", start.elapsed().as_secs_f64(), e.message());
                return None;
            }
        };
        let now = line(&t);
        if last.as_ref().map(line) != Some(now.clone()) {
            eprintln!("[{:>6.1}s] {now}", start.elapsed().as_secs_f64());
        }
        *last = Some(t.clone());
        if let Some(r) = done(&t) {
            return Some(r);
        }
    }
    None
}

/// A job not yet seen by the operator has no phase: it is pending, as the
/// kubeconfig commands say too.
fn shown_phase(j: &api::Job) -> &str {
    if j.phase.is_empty() { "Pending" } else { &j.phase }
}

fn progress(j: &api::Job) -> String {
    crate::output::progress_line(Some(&j.phase), &j.message)
}

/// A lease's state, with how it closed once it has.
fn lease_state(l: &api::LeaseView) -> String {
    match (l.state.as_str(), l.close_reason.as_str()) {
        ("", _) => "Pending".into(),
        (s, "") => s.into(),
        (s, why) => format!("{s} ({why})"),
    }
}

fn lease_progress(l: &api::LeaseView) -> String {
    let mut s = format!("{} in {}", lease_state(l), l.provider_org);
    if !l.deposited.is_empty() {
        s.push_str(&format!(", {} deposited", shown(&l.deposited)));
    }
    if !l.workload_phase.is_empty() {
        s.push_str(&format!(", workload {}", l.workload_phase));
    }
    if !l.message.is_empty() {
        s.push_str(&format!(": {}", l.message));
    }
    s
}

/// The phase the Pool API names, as the resource's type.
fn phase(s: &str) -> Option<AiJobPhase> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

fn summary(j: &api::Job) -> String {
    let mut s = format!("aijob/{} {}", j.name, shown_phase(j));
    if !j.runs_on_org.is_empty() {
        s.push_str(&format!(" in {}", j.runs_on_org));
    }
    if let Some(code) = j.exit_code {
        s.push_str(&format!(", exit code {code}"));
    }
    if !j.cost_so_far.is_empty() {
        s.push_str(&format!(", cost {} tokens", shown(&j.cost_so_far)));
    }
    if !j.message.is_empty() {
        s.push_str(&format!(": {}", j.message));
    }
    s + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_names_phases_as_the_resource_does() {
        assert_eq!(phase("Running"), Some(AiJobPhase::Running));
        assert_eq!(phase("Failed"), Some(AiJobPhase::Failed));
        assert_eq!(phase(""), None);
        let j = api::Job {
            name: "eval".into(),
            phase: "Succeeded".into(),
            runs_on_org: "bravo".into(),
            exit_code: Some(0),
            cost_so_far: "0.004888888888888888".into(),
            ..Default::default()
        };
        assert_eq!(
            summary(&j),
            "aijob/eval Succeeded in bravo, exit code 0, cost 0.004889 tokens\n"
        );
    }

    #[test]
    fn a_lease_reads_as_its_state_and_how_it_closed() {
        let mut l = api::LeaseView {
            provider_org: "bravo".into(),
            ..Default::default()
        };
        assert_eq!(lease_state(&l), "Pending");
        l.state = "Active".into();
        l.deposited = "4.3999999999999992".into();
        l.message = "adding 0.1 tokens".into();
        assert_eq!(lease_progress(&l), "Active in bravo, 4.4 deposited: adding 0.1 tokens");
        l.state = "Closed".into();
        l.close_reason = "InsufficientFunds".into();
        assert_eq!(lease_state(&l), "Closed (InsufficientFunds)");
    }
}
