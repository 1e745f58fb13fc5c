//! The Rust SDK for durable Durin handlers.
//!
//! Write a handler as an async function of a [`Context`] and a typed input; serve it with an
//! [`Endpoint`]. Every `ctx.run(name, f)` is a journaled step: on the first execution its
//! result (or terminal error) is appended to the journal through the gateway, durably,
//! before `run` returns; when Durin calls the handler again after a crash, recorded steps
//! return their recorded results without running `f`. `ctx.now()`, `ctx.uuid()` and
//! `ctx.random()` are recorded the same way, so a replay sees the same values.
//!
//! ```no_run
//! use durin_sdk::{Context, Endpoint, HandlerError, Service};
//!
//! async fn greet(ctx: Context, name: String) -> Result<String, HandlerError> {
//!     let id = ctx.uuid().await?;
//!     let greeting = ctx
//!         .run("compose", || async move { Ok(format!("hello {name} ({id})")) })
//!         .await?;
//!     Ok(greeting)
//! }
//!
//! # async fn serve() -> std::io::Result<()> {
//! let listener = durin_sdk::bind("127.0.0.1:9080").await?;
//! Endpoint::new()
//!     .service(Service::new("greeter").handler("greet", greet))
//!     .serve(listener)
//!     .await
//! # }
//! ```
//!
//! Version 2 of the protocol adds durable waits: `ctx.sleep(d)`, `ctx.signal(name)`,
//! `ctx.awakeable()` and `ctx.first(&[...])` (the first of several, e.g. a signal raced
//! against a timer) journal a command; when its result has not arrived the attempt ends
//! suspended and Durin calls the handler again when it has. `ctx.set(key, value)` keeps
//! durable state that queries read without calling the handler.
//!
//! Version 6 streams the attempt: the handler answers Durin's call at once and, while
//! Durin's request and the answer both stay open, every append and its acknowledgement
//! travel as lines of that one exchange instead of a call to the gateway each.
//!
//! Steps of one invocation run one after the other: a handler must not run two `ctx` calls
//! concurrently, because the order of the journal must not depend on timing.

mod context;
mod endpoint;
mod error;
mod stream;

pub use context::{Awakeable, Context, ParentClose, RunOptions, Waitable};
pub use durin_protocol::{KeySpec, RetryPolicy};
pub use endpoint::{
    bind, Endpoint, HandlerOptions, Service, DEFAULT_MAX_REQUEST_BYTES, LISTEN_BACKLOG,
};
pub use error::HandlerError;
