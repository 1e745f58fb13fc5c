//! The tutorial's order workflow as a durable Durin handler.
//!
//! `order/process` takes `{"order_id", "customer_id", "amount_cents"}` and runs three
//! journaled steps: `charge_payment`, `reserve_inventory`, `send_confirmation`. Each step
//! waits `--step-delay-ms` first (so that a person can kill things mid-flow) and, when
//! `--downstream URL` is given, performs its side effect as `POST {URL}/{step}` with an
//! `Idempotency-Key` of `{invocation id}:{step}:{order id}`, the way a payment API would be
//! called.
//! Cancelled (`POST /v1/invocations/{id}/cancel`), it compensates what it started, in
//! reverse order: `release_inventory`, then `refund_payment`, and ends cancelled.
//! `tally/run` consumes `add` signals and continues as new every few of them.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use durin_sdk::{
    Context, Endpoint, HandlerError, HandlerOptions, RetryPolicy, RunOptions, Service,
};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug, Clone)]
#[command(name = "order", about = "The order workflow example for Durin")]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9080")]
    pub listen: SocketAddr,
    /// Delay before each step, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub step_delay_ms: u64,
    /// Base URL of the service that receives each step's side effect.
    #[arg(long)]
    pub downstream: Option<String>,
    /// First retry interval of a failing step, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub step_retry_initial_ms: u64,
    /// Reserve the inventory before charging the payment: a build whose change breaks
    /// what runs (orders recorded by the usual build cannot replay on it), to see
    /// `durin replay` and a verified registration refuse it.
    #[arg(long)]
    pub reserve_first: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub amount_cents: u64,
}

struct Steps {
    args: Args,
    http: reqwest::Client,
}

impl Steps {
    /// One step's side effect: wait, then tell the downstream (if any), then answer `value`.
    async fn perform(
        &self,
        ctx: &Context,
        step: &str,
        order: &Order,
        value: String,
    ) -> Result<String, HandlerError> {
        // Only when asked: even a zero sleep waits for the timer's next tick (about 1 ms).
        if self.args.step_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.args.step_delay_ms)).await;
        }
        if let Some(downstream) = &self.args.downstream {
            let response = self
                .http
                .post(format!("{}/{step}", downstream.trim_end_matches('/')))
                .header(
                    "idempotency-key",
                    format!("{}:{step}:{}", ctx.invocation_id(), order.order_id),
                )
                .json(&serde_json::json!({
                    "order_id": order.order_id,
                    "customer_id": order.customer_id,
                    "amount_cents": order.amount_cents,
                }))
                .send()
                .await?;
            let status = response.status();
            if status.is_client_error() {
                return Err(HandlerError::terminal_with_status(
                    422,
                    format!("{step} was refused by the downstream ({status})"),
                ));
            }
            if !status.is_success() {
                return Err(HandlerError::retryable(format!(
                    "{step}: the downstream answered {status}"
                )));
            }
        }
        Ok(value)
    }

    fn options(&self) -> RunOptions {
        RunOptions::retry_policy(RetryPolicy {
            initial_interval: Duration::from_millis(self.args.step_retry_initial_ms),
            maximum_interval: Duration::from_millis(self.args.step_retry_initial_ms * 10),
            maximum_attempts: Some(5),
            ..RetryPolicy::default()
        })
    }
}

async fn process(steps: Arc<Steps>, ctx: Context, order: Order) -> Result<String, HandlerError> {
    if order.amount_cents == 0 {
        return Err(
            HandlerError::terminal_with_status(422, "amount_cents must be positive")
                .with_type("InvalidOrder"),
        );
    }
    // A saga: each step's compensation is noted before the step runs (a step cut short by
    // the cancellation may have had its effect), and a cancellation runs the noted ones in
    // reverse order, each a journaled step of its own, before the order ends cancelled.
    let mut compensations = Vec::new();
    let result = run_steps(&steps, &ctx, &order, &mut compensations).await;
    match result {
        Err(error) if error.is_cancelled() => {
            for (compensation, value) in compensations.into_iter().rev() {
                ctx.run_with(compensation, steps.options(), || {
                    steps.perform(&ctx, compensation, &order, value)
                })
                .await?;
            }
            Err(error)
        }
        other => other,
    }
}

async fn run_steps(
    steps: &Steps,
    ctx: &Context,
    order: &Order,
    compensations: &mut Vec<(&'static str, String)>,
) -> Result<String, HandlerError> {
    let refund = ("refund_payment", format!("refund_{}", order.order_id));
    let release = ("release_inventory", format!("release_{}", order.order_id));
    let charge = || {
        ctx.run_with("charge_payment", steps.options(), || {
            let value = format!("charge_{}", order.order_id);
            steps.perform(ctx, "charge_payment", order, value)
        })
    };
    let reserve = || {
        ctx.run_with("reserve_inventory", steps.options(), || {
            let value = format!("reservation_{}", order.order_id);
            steps.perform(ctx, "reserve_inventory", order, value)
        })
    };
    let (charge, reservation) = if steps.args.reserve_first {
        compensations.push(release);
        let reservation = reserve().await?;
        compensations.push(refund);
        (charge().await?, reservation)
    } else {
        compensations.push(refund);
        let charge = charge().await?;
        compensations.push(release);
        (charge, reserve().await?)
    };
    ctx.run_with("send_confirmation", steps.options(), || {
        let value = format!("confirmation_{}", order.customer_id);
        steps.perform(ctx, "send_confirmation", order, value)
    })
    .await?;
    Ok(format!(
        "order {} complete charge {charge} reservation {reservation}",
        order.order_id
    ))
}

/// The input of the tutorial's approval workflow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub request: String,
    /// The approval deadline: without a `cancel` signal by then, the request is approved.
    pub deadline_secs: u64,
}

/// The tutorial's approval workflow (`approval/run`): a `cancel` signal, an `is_cancelled`
/// query (durable state), and a timer as the approval deadline, raced against the signal.
/// While it waits, the workflow holds no connection and no task: it is a row in Durin.
async fn approval(ctx: Context, input: ApprovalRequest) -> Result<String, HandlerError> {
    // The `note` update: a validated note for whoever approves (a query reads them all).
    // The notes live in memory; replaying the accepted updates rebuilds them.
    let notes = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    ctx.on_update(
        "note",
        |note: &String| {
            if note.trim().is_empty() || note.len() > 200 {
                return Err(HandlerError::terminal_with_status(
                    422,
                    "a note is 1 to 200 characters",
                ));
            }
            Ok(())
        },
        move |ctx: Context, note: String| {
            let notes = Arc::clone(&notes);
            async move {
                let all = {
                    let mut notes = notes.lock().unwrap_or_else(|e| e.into_inner());
                    notes.push(note);
                    notes.clone()
                };
                ctx.set("notes", &all).await?;
                Ok::<_, HandlerError>(all)
            }
        },
    );
    ctx.set("is_cancelled", &false).await?;
    ctx.set("status", &"waiting for the deadline").await?;
    let deadline = ctx.timer(Duration::from_secs(input.deadline_secs)).await?;
    let cancel = ctx.signal_waiter("cancel").await?;
    if ctx.first(&[&cancel, &deadline]).await? == 0 {
        let reason: serde_json::Value = cancel.value()?;
        ctx.set("is_cancelled", &true).await?;
        ctx.set("status", &"cancelled").await?;
        return Ok(format!("request {} cancelled: {reason}", input.request));
    }
    ctx.set("status", &"approved").await?;
    Ok(format!("request {} approved", input.request))
}

/// The endpoint serving `order/process` and the `approval` workflow.
pub fn endpoint(args: Args) -> Endpoint {
    let steps = Arc::new(Steps {
        args,
        http: reqwest::Client::new(),
    });
    let billing = Arc::clone(&steps);
    let batches = Arc::clone(&steps);
    Endpoint::new()
        .service(Service::new("order").handler("process", move |ctx, order| {
            process(Arc::clone(&steps), ctx, order)
        }))
        .service(
            Service::new("subscription").handler("run", move |ctx, sub| {
                subscription(Arc::clone(&billing), ctx, sub)
            }),
        )
        .service(Service::new("batch").handler_with(
            "run",
            HandlerOptions {
                heartbeat_timeout: Some(Duration::from_secs(1)),
                start_to_close: Some(Duration::from_secs(120)),
                ..HandlerOptions::default()
            },
            move |ctx, job| batch(Arc::clone(&batches), ctx, job),
        ))
        .service(Service::new("approval").handler("run", approval))
        .service(Service::new("tally").handler("run", tally))
        .service(Service::new("checkout").handler("run", checkout).handler(
            "receipt",
            |_ctx: Context, orders: usize| async move {
                Ok::<_, HandlerError>(format!("receipt for {orders} orders"))
            },
        ))
}

/// The input of the tutorial's subscription workflow (`subscription/run`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subscription {
    pub customer_id: String,
    pub amount_cents: u64,
    /// Billing cycles done so far (0 for a new subscription).
    #[serde(default)]
    pub cycle: u32,
    /// Cycles after which the subscription ends; `None` bills for ever.
    #[serde(default)]
    pub cycles: Option<u32>,
    /// Cycles per run: the run then continues as new, so its journal stays short.
    #[serde(default = "three")]
    pub cycles_per_run: u32,
    /// The billing period in milliseconds: 30 days unless given (a demo or a test makes
    /// it short).
    #[serde(default)]
    pub period_ms: Option<u64>,
}

fn three() -> u32 {
    3
}

/// The tutorial's subscription billing loop: sleeps 30 days (a durable timer), charges,
/// and continues as new every `cycles_per_run` cycles (or when Durin suggests it), so a
/// subscription billed for years never has a long journal. `cycles` is a query.
async fn subscription(
    steps: Arc<Steps>,
    ctx: Context,
    sub: Subscription,
) -> Result<String, HandlerError> {
    const MONTH: Duration = Duration::from_secs(30 * 24 * 3600);
    let period = sub.period_ms.map_or(MONTH, Duration::from_millis);
    let mut cycle = sub.cycle;
    // Each run has its own state: the query answers from the first moment of every run.
    ctx.set("cycles", &cycle).await?;
    loop {
        if sub.cycles.is_some_and(|n| cycle >= n) {
            return Ok(format!("{} billed {cycle} cycles", sub.customer_id));
        }
        let this_run = cycle - sub.cycle;
        if this_run >= sub.cycles_per_run.max(1) || ctx.suggest_continue_as_new() {
            return ctx.continue_as_new(&Subscription { cycle, ..sub });
        }
        ctx.sleep(period).await?;
        let order = Order {
            order_id: format!("{}-{cycle}", sub.customer_id),
            customer_id: sub.customer_id.clone(),
            amount_cents: sub.amount_cents,
        };
        let step = format!("charge_{cycle}");
        ctx.run_with(&step, steps.options(), || {
            let value = format!("charge_{}", order.order_id);
            steps.perform(&ctx, "charge_payment", &order, value)
        })
        .await?;
        cycle += 1;
        ctx.set("cycles", &cycle).await?;
    }
}

/// The input of `tally/run`: the keys consumed by the earlier runs of the workflow id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counter {
    /// Keys of the `add` signals consumed so far, in order (empty for a new workflow).
    #[serde(default)]
    pub consumed: Vec<String>,
    /// `add` signals per run: the run then continues as new with what it consumed.
    #[serde(default = "three")]
    pub per_run: u32,
}

/// The payload of a `tally/run` `add` signal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Add {
    pub key: String,
}

/// What `tally/run` answers on `finish`: every key it consumed, across its runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counted {
    pub consumed: Vec<String>,
}

/// A loop over signals that continues as new (`tally/run`): it waits for the first of an
/// `add` signal (`{"key"}`) and a `finish` signal; each `add` appends its key to
/// `consumed` (also the `consumed` query), and after `per_run` of them the run continues
/// as new with the keys so far; `finish` ends the workflow with `{"consumed": [...]}`.
/// Every signal it is sent is consumed once, whichever run it reaches: the storm test
/// (`tests/storm.rs`) counts them.
async fn tally(ctx: Context, input: Counter) -> Result<Counted, HandlerError> {
    let mut consumed = input.consumed;
    let per_run = input.per_run.max(1);
    ctx.set("consumed", &consumed).await?;
    let mut this_run = 0;
    loop {
        if this_run >= per_run {
            return ctx.continue_as_new(&Counter { consumed, per_run });
        }
        let add = ctx.signal_waiter("add").await?;
        let finish = ctx.signal_waiter("finish").await?;
        if ctx.first(&[&add, &finish]).await? != 0 {
            return Ok(Counted { consumed });
        }
        let Add { key } = add.value()?;
        consumed.push(key);
        ctx.set("consumed", &consumed).await?;
        this_run += 1;
    }
}

/// The input of `batch/run`: items to process, each taking `item_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    pub items: u32,
    pub item_ms: u64,
}

/// A long step that reports its progress (`batch/run`): it processes the items one by one
/// (each a `POST {downstream}/batch_item` when `--downstream` is given) and sends a
/// heartbeat after each. The handler declares a 1 s `heartbeat_timeout`: when it hangs,
/// Durin ends the attempt after a second (not after `start_to_close`), and the next
/// attempt starts after the last item a heartbeat reported done.
async fn batch(steps: Arc<Steps>, ctx: Context, job: Batch) -> Result<String, HandlerError> {
    let from: u32 = ctx.last_heartbeat_details().unwrap_or(0);
    let done = ctx
        .run("process", || async {
            for item in from..job.items {
                tokio::time::sleep(Duration::from_millis(job.item_ms)).await;
                if let Some(downstream) = &steps.args.downstream {
                    steps
                        .http
                        .post(format!("{}/batch_item", downstream.trim_end_matches('/')))
                        .header(
                            "idempotency-key",
                            format!("{}:item-{item}", ctx.invocation_id()),
                        )
                        .send()
                        .await?;
                }
                ctx.heartbeat(&(item + 1)).await?;
            }
            Ok(job.items)
        })
        .await?;
    Ok(format!(
        "processed {done} items, the last attempt from item {from}"
    ))
}

/// The input of `checkout/run`: orders placed together.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cart {
    pub orders: Vec<Order>,
}

/// A parent workflow (`checkout/run`): each order of the cart is a child invocation of
/// `order/process`, started once and awaited in turn; the receipt is sent one way, a
/// little later, as `checkout/receipt`.
async fn checkout(ctx: Context, cart: Cart) -> Result<String, HandlerError> {
    let mut done = Vec::new();
    for order in &cart.orders {
        let output: String = ctx.call("order", "process", order).await?;
        done.push(output);
    }
    ctx.send(
        "checkout",
        "receipt",
        &done.len(),
        Some(Duration::from_millis(100)),
    )
    .await?;
    Ok(done.join("; "))
}

/// Entry point of the `order` binary.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("order: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async move {
        let listener = durin_sdk::bind(args.listen).await?;
        // Scripts and tests read this line to learn the port when listening on port 0.
        println!(
            "order service listening on http://{}",
            listener.local_addr()?
        );
        endpoint(args).serve(listener).await?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order: {e:#}");
            ExitCode::FAILURE
        }
    }
}
