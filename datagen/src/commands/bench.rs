//! `datagen bench client` and the loopback server it measures against.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use distill::benchmark::run_reference;

#[derive(Args)]
pub struct BenchClientArgs {
    /// Requests to make.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Ask for whole responses instead of server-sent events.
    #[arg(long)]
    no_stream: bool,
    /// A command that makes the same requests with another client and prints one JSON line
    /// {"requests_per_s": …, "cpu_ms_per_request": …}; it is given --url, --requests,
    /// --concurrency (and --no-stream); e.g.
    /// `.venv/bin/python datagen/benches/reference_client.py`.
    #[arg(long)]
    reference: Option<String>,
}

/// CPU time (user + system) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Serves until killed, printing its URL first.
pub fn serve_loopback() -> Result<()> {
    let server = datagen::teacher::loopback::serve(datagen::teacher::loopback::Behaviour { keep_alives: false, ..Default::default() }, HashMap::new());
    println!("{}", server.url());
    loop {
        std::thread::park();
    }
}

/// The client's overhead: a server in another process that answers at once, `requests`
/// chat completions through the same code `datagen run` uses, and the CPU this process spent.
pub fn bench_client(args: BenchClientArgs) -> Result<()> {
    use std::io::BufRead;
    let mut server = std::process::Command::new(std::env::current_exe()?)
        .arg("serve-loopback")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the loopback server")?;
    let mut url = String::new();
    std::io::BufReader::new(server.stdout.take().context("server stdout")?).read_line(&mut url)?;
    let url = url.trim().to_string();
    let request = datagen::teacher::openai::ChatRequest {
        model: "bench".into(),
        messages: vec![("user".into(), "What is 1+1?".into())],
        temperature: 0.6,
        top_p: 0.95,
        max_tokens: 64,
        stream: !args.no_stream,
        seed: None,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let (cpu_before, started) = (cpu_seconds(), Instant::now());
    let failures = runtime.block_on(async {
        let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build().expect("client");
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..args.requests {
            let permit = permits.clone().acquire_owned().await.expect("open semaphore");
            let (http, url, request) = (http.clone(), url.clone(), request.clone());
            tasks.spawn(async move {
                let result = datagen::teacher::openai::chat(&http, &url, None, &request, Duration::from_secs(60), Duration::from_secs(60)).await;
                drop(permit);
                result.is_err()
            });
            while tasks.try_join_next().is_some() {}
        }
        let mut failures = 0;
        while let Some(failed) = tasks.join_next().await {
            failures += failed.unwrap_or(true) as usize;
        }
        failures
    });
    let (seconds, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu_before);
    println!("{} requests at concurrency {}, {}, {failures} failed", args.requests, args.concurrency, if args.no_stream { "whole responses" } else { "streamed" });
    let rate = args.requests as f64 / seconds;
    let cpu_ms = 1000.0 * cpu / args.requests as f64;
    println!("datagen  {rate:>9.0} requests/s   {cpu_ms:>6.3} ms CPU per request");
    let result = match &args.reference {
        Some(command) => (|| -> Result<()> {
            let reference = run_reference(&format!(
                "{command} --url {url} --requests {} --concurrency {}{}",
                args.requests, args.concurrency, if args.no_stream { " --no-stream" } else { "" }
            ))?;
            let value = |key: &str| reference[key].as_f64().with_context(|| format!("reference JSON lacks {key}"));
            let (reference_rate, reference_cpu) = (value("requests_per_s")?, value("cpu_ms_per_request")?);
            println!("python   {reference_rate:>9.0} requests/s   {reference_cpu:>6.3} ms CPU per request");
            println!("ratio    {:>9.2}× requests/s {:>6.2}× CPU per request (datagen / python; > 1 and < 1 are better)", rate / reference_rate, cpu_ms / reference_cpu);
            Ok(())
        })(),
        None => Ok(()),
    };
    let _ = server.kill();
    let _ = server.wait();
    result
}
