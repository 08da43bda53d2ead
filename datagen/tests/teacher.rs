//! `datagen run` against a real OpenAI-compatible server on loopback: every reasoning shape,
//! streamed and not, and the faults real servers produce.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Behaviour, Fault, Shape, serve, serve_at};
use datagen::filters::FilterConfig;
use datagen::prompts::{PromptFields, read_prompts};
use datagen::run::{DEFAULT_TEMPLATE, Quiet, RunConfig, RunError, Sampling, Summary, run};
use datagen::schema::Row;
use datagen::scoring::{Keep, ScoreOptions};
use datagen::store;

fn config(out: &Path, endpoints: Vec<String>, stream: bool) -> RunConfig {
    RunConfig {
        out: out.to_path_buf(),
        endpoints,
        api_key: Some("sk-test".into()),
        sampling: Sampling {
            model: "deepseek-ai/DeepSeek-R1".into(),
            temperature: 0.6,
            top_p: 0.95,
            max_tokens: 1024,
            prompt_template: DEFAULT_TEMPLATE.into(),
            system_prompt: None,
        },
        samples: 2,
        concurrency: 4,
        stream,
        max_retries: 4,
        length_retries: 0,
        request_timeout: Duration::from_secs(10),
        stall_timeout: Duration::from_secs(10),
        max_outage: Duration::ZERO,
        max_requests_per_minute: None,
        max_tokens_per_minute: None,
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(100),
        score: ScoreOptions { keep: Keep::Correct, filters: FilterConfig::default() },
        verify: Default::default(),
        shard_rows: 3,
        generation: 0,
        tokenizer: None,
        local: None,
    }
}

fn go(prompts_n: usize, config: RunConfig) -> (Result<Summary, RunError>, Vec<Row>) {
    let dir = config.out.clone();
    let prompts = read_prompts(&common::prompt_file(&dir, prompts_n), &PromptFields::default()).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let result = runtime.block_on(run(&prompts, config, &mut Quiet, std::future::pending()));
    let rows = store::read_all(&dir.join("data"), 0).unwrap();
    (result, rows)
}

#[test]
fn every_reasoning_shape_streamed_and_not() {
    for shape in [Shape::ReasoningContent, Shape::Reasoning, Shape::ThinkTags, Shape::Prefilled] {
        for stream in [true, false] {
            let server = serve(Behaviour { shape, no_done: shape == Shape::Reasoning, ..Behaviour::default() }, common::bundled_answers(&common::math_prompts(3)));
            let dir = tempfile::tempdir().unwrap();
            let (summary, mut rows) = go(3, config(dir.path(), vec![server.url()], stream));
            let summary = summary.unwrap();
            assert_eq!((summary.stored, summary.failed), (6, 0), "{shape:?} stream={stream}");
            rows.sort_by(|a, b| a.key.cmp(&b.key));
            let expected = match shape {
                Shape::ReasoningContent => "reasoning_content",
                Shape::Reasoning => "reasoning",
                Shape::ThinkTags => "think_tags",
                Shape::Prefilled => "think_tags_prefilled",
            };
            for row in &rows {
                assert_eq!(row.reasoning_parser.as_deref(), Some(expected), "{shape:?} stream={stream}");
                assert!(row.reasoning.as_deref().unwrap().starts_with("Let me work"), "{:?}", row.reasoning);
                assert!(row.content.as_deref().unwrap().contains("\\boxed{"), "{:?}", row.content);
                let assistant = &row.messages.as_ref().unwrap()[1];
                assert!(assistant.content.starts_with("<think>\nLet me work") && assistant.content.contains("</think>\n\nThe answer"));
                assert!(row.messages.as_ref().unwrap()[0].content.ends_with("within \\boxed{}."));
                assert_eq!((row.prompt_tokens, row.completion_tokens), (Some(20), Some(30)));
                assert_eq!(row.finish_reason.as_deref(), Some("stop"));
            }
            // The server answers right on a problem's first request and wrong on its second.
            let correct = rows.iter().filter(|r| r.correct == Some(true)).count();
            assert_eq!(correct, 3, "{shape:?} stream={stream}");
            assert_eq!(rows.iter().filter(|r| r.accepted).count(), 3);
            let (_, authorization) = &server.bodies.lock().unwrap()[0];
            assert_eq!(authorization.as_deref(), Some("Bearer sk-test"));
        }
    }
}

#[test]
fn faults_are_retried_and_every_sample_lands() {
    let faults = vec![
        Fault::TooManyRequests(1),
        Fault::ServerError,
        Fault::MalformedJson,
        Fault::CutStream,
        Fault::Hang(Duration::from_secs(5)),
        Fault::MalformedJson,
    ];
    for stream in [true, false] {
        let server = serve(Behaviour { faults: faults.clone(), omit_usage: true, ..Behaviour::default() }, common::bundled_answers(&common::math_prompts(3)));
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), vec![server.url()], stream);
        config.request_timeout = Duration::from_secs(1);
        config.concurrency = 1;
        config.max_retries = 8;
        let started = std::time::Instant::now();
        let (summary, rows) = go(3, config);
        let summary = summary.unwrap();
        assert_eq!((summary.stored, summary.failed), (6, 0), "stream={stream}");
        assert_eq!(rows.len(), 6);
        // A cut stream is a fault of streaming only.
        let effective = if stream { faults.len() } else { faults.len() - 1 };
        assert_eq!(rows.iter().map(|r| r.attempts as usize).sum::<usize>(), 6 + effective, "one retry per fault, stream={stream}");
        assert!(rows.iter().all(|r| r.completion_tokens.is_none() && r.usage_source.is_none()), "usage omitted by the server");
        // Retry-After: 1 was honoured (and the hang cut at the 1 s deadline).
        assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    }
}

/// A teacher down for longer than a sample's retry budget (every request a 5xx), then back: the
/// outage is waited out and nothing is stored as failed; with no --max-outage, samples fail.
#[test]
fn an_outage_longer_than_the_retry_budget_is_waited_out() {
    for (max_outage, failed) in [(Duration::from_secs(600), 0), (Duration::ZERO, 2)] {
        let server = serve(Behaviour { faults: vec![Fault::ServerError; 12], ..Behaviour::default() }, common::bundled_answers(&common::math_prompts(2)));
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), vec![server.url()], false);
        (config.concurrency, config.samples, config.max_retries) = (1, 1, 2);
        (config.backoff_base, config.backoff_cap, config.max_outage) = (Duration::from_millis(1), Duration::from_millis(20), max_outage);
        let (summary, rows) = go(2, config);
        let summary = summary.unwrap();
        assert_eq!((summary.stored, summary.failed), (2, failed), "max_outage {max_outage:?}");
        if failed == 0 {
            // The first sample rode out all twelve failures; the second found the teacher back.
            let attempts: Vec<u32> = rows.iter().map(|r| r.attempts).collect();
            assert_eq!(attempts.iter().sum::<u32>(), 12 + 2, "{attempts:?}");
        } else {
            // Each spent its three attempts (1 + --max-retries 2).
            assert!(rows.iter().all(|r| r.error_class.as_deref() == Some("server") && r.attempts == 3));
        }
    }
}

/// A teacher that refuses connections (down, restarting) for longer than the retry budget, then
/// comes back on the same port: the outage is waited out and every sample is stored.
#[test]
fn refused_connections_until_the_teacher_is_back_are_waited_out() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), vec![format!("http://127.0.0.1:{port}/v1")], false);
    (config.concurrency, config.samples, config.max_retries) = (1, 1, 2);
    (config.backoff_base, config.backoff_cap, config.max_outage) = (Duration::from_millis(5), Duration::from_millis(50), Duration::from_secs(600));
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        serve_at(Behaviour::default(), common::bundled_answers(&common::math_prompts(2)), port)
    });
    let (summary, rows) = go(2, config);
    let _server = back.join().unwrap();
    let summary = summary.unwrap();
    assert_eq!((summary.stored, summary.failed), (2, 0));
    assert!(rows[0].attempts > 3, "the first sample outlived its retry budget: {} attempts", rows[0].attempts);
}

/// A stream that goes silent is given up after --stall-timeout and retried.
#[test]
fn a_stalled_stream_is_retried() {
    let server = serve(Behaviour { faults: vec![Fault::Stall(Duration::from_secs(5))], ..Behaviour::default() }, common::bundled_answers(&common::math_prompts(1)));
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), vec![server.url()], true);
    (config.concurrency, config.samples, config.stall_timeout) = (1, 1, Duration::from_millis(300));
    config.backoff_base = Duration::from_millis(1);
    let (summary, rows) = go(1, config);
    assert_eq!(summary.unwrap().failed, 0);
    assert_eq!((rows[0].status.as_str(), rows[0].attempts), ("ok", 2));
}

/// --max-requests-per-minute 120 (two a second, a burst of two): six requests take two seconds
/// at least; --max-tokens-per-minute holds requests back after a large one.
#[test]
fn requests_and_tokens_per_minute_are_limited() {
    let server = serve(Behaviour::default(), common::bundled_answers(&common::math_prompts(3)));
    let dir = tempfile::tempdir().unwrap();
    let mut limited = config(dir.path(), vec![server.url()], false);
    limited.max_requests_per_minute = Some(120);
    let started = std::time::Instant::now();
    let (summary, _) = go(3, limited);
    assert_eq!(summary.unwrap().stored, 6);
    assert!(started.elapsed() >= Duration::from_millis(1900), "{:?}", started.elapsed());
    // 50 tokens a request (the server's usage) at 3,000 a minute (50 a second), one second's
    // worth to start with, four requests in flight allowed: each reserves the average usage, so
    // after the first two each later one waits about a second for its tokens instead of all
    // going at once.
    let server = serve(Behaviour::default(), common::bundled_answers(&common::math_prompts(3)));
    let dir = tempfile::tempdir().unwrap();
    let mut limited = config(dir.path(), vec![server.url()], false);
    (limited.concurrency, limited.max_tokens_per_minute) = (4, Some(3000));
    let started = std::time::Instant::now();
    let (summary, _) = go(3, limited);
    assert_eq!(summary.unwrap().stored, 6);
    assert!(started.elapsed() >= Duration::from_millis(3500), "{:?}", started.elapsed());
}

/// `Retry-After` as an HTTP date (two seconds ahead, whole seconds) is waited out.
#[test]
fn retry_after_as_an_http_date_is_honoured() {
    let server = serve(Behaviour { faults: vec![Fault::TooManyRequestsUntil(2)], ..Behaviour::default() }, common::bundled_answers(&common::math_prompts(1)));
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), vec![server.url()], false);
    config.concurrency = 1;
    config.samples = 1;
    config.backoff_base = Duration::from_millis(1);
    let started = std::time::Instant::now();
    let (summary, rows) = go(1, config);
    assert_eq!(summary.unwrap().failed, 0);
    assert_eq!(rows[0].attempts, 2);
    // Without the date the backoff would have been 1 ms; the date asked for one to two seconds.
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
}

#[test]
fn a_prompt_that_exhausts_its_retries_is_stored_as_failed() {
    let server = serve(Behaviour { faults: vec![Fault::ServerError; 100], ..Behaviour::default() }, Default::default());
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), vec![server.url()], true);
    config.max_retries = 2;
    let (summary, rows) = go(2, config);
    let summary = summary.unwrap();
    assert_eq!((summary.stored, summary.failed), (4, 4));
    for row in &rows {
        assert_eq!((row.status.as_str(), row.attempts, row.accepted), ("failed", 3, false));
        assert!(row.error.as_deref().unwrap().contains("HTTP 500"), "{:?}", row.error);
    }
}

#[test]
fn a_wrong_api_key_stops_the_run_at_once() {
    let server = serve(Behaviour { faults: vec![Fault::Unauthorized; 100], ..Behaviour::default() }, Default::default());
    let dir = tempfile::tempdir().unwrap();
    let (result, rows) = go(5, config(dir.path(), vec![server.url()], true));
    let error = result.unwrap_err().to_string();
    assert!(error.contains("HTTP 401") && error.contains("Invalid API key"), "{error}");
    // The requests already in flight (concurrency 4) come back refused too; nothing more is sent.
    assert!(server.requests() <= 4, "not retried: {} requests", server.requests());
    assert!(rows.is_empty());
}

#[test]
fn a_slow_endpoint_beside_a_fast_one_gets_less_work() {
    let answers = common::bundled_answers(&common::math_prompts(10));
    let slow = serve(Behaviour { delay: Duration::from_millis(400), ..Behaviour::default() }, answers.clone());
    let fast = serve(Behaviour::default(), answers);
    let dir = tempfile::tempdir().unwrap();
    let (summary, rows) = go(10, config(dir.path(), vec![slow.url(), fast.url()], true));
    assert_eq!(summary.unwrap().stored, 20);
    let on_fast = rows.iter().filter(|r| r.endpoint.as_deref() == Some(fast.url().as_str())).count();
    assert!(on_fast >= 14, "the fast endpoint served {on_fast} of 20");
}

/// The stored Parquet read back with arrow/parquet has the documented schema, and
/// datasets/SCHEMA.md lists every column with its type.
#[test]
fn parquet_output_matches_the_schema_document() {
    let server = serve(Behaviour::default(), common::bundled_answers(&common::math_prompts(2)));
    let dir = tempfile::tempdir().unwrap();
    let (summary, _) = go(2, config(dir.path(), vec![server.url()], true));
    summary.unwrap();
    let shards = store::shards(&dir.path().join("data"), 0).unwrap();
    assert_eq!(shards.len(), 2, "4 rows at 3 per shard");
    let file = std::fs::File::open(&shards[0]).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = reader.schema().clone();
    let document = std::fs::read_to_string(common::repo_root().join("datasets/SCHEMA.md")).unwrap();
    for field in schema.fields() {
        let type_name = match field.data_type() {
            arrow::datatypes::DataType::Utf8 => "string".to_string(),
            arrow::datatypes::DataType::Boolean => "bool".to_string(),
            arrow::datatypes::DataType::UInt32 => "uint32".to_string(),
            arrow::datatypes::DataType::UInt64 => "uint64".to_string(),
            arrow::datatypes::DataType::Float64 => "double".to_string(),
            arrow::datatypes::DataType::Timestamp(_, _) => "timestamp[ms, UTC]".to_string(),
            arrow::datatypes::DataType::List(item) if item.data_type() == &arrow::datatypes::DataType::Utf8 => "list<string>".to_string(),
            arrow::datatypes::DataType::List(_) => "list<struct<role: string, content: string>>".to_string(),
            other => panic!("undocumented type {other:?}"),
        };
        let line = format!("| `{}` | {} |", field.name(), type_name);
        assert!(document.contains(&line), "SCHEMA.md lacks the line `{line}`");
    }
    assert_eq!(schema.as_ref(), datagen::schema::schema().as_ref());
    let rows = reader.build().unwrap().map(|b| datagen::schema::from_batch(&b.unwrap()).unwrap()).next().unwrap();
    assert_eq!(rows.len(), 3);
}

/// A server that sends no usage: with the teacher's tokenizer, tokens are counted locally.
#[test]
fn tokens_are_counted_locally_when_the_server_sends_no_usage() {
    let server = serve(Behaviour { omit_usage: true, ..Behaviour::default() }, common::bundled_answers(&common::math_prompts(1)));
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), vec![server.url()], true);
    let tokenizer = distill::text::Tokenizer::from_dir(&common::repo_root().join("tests/fixtures/tokenizers/deepseek-r1-distill-qwen")).unwrap();
    config.tokenizer = Some(std::sync::Arc::new(tokenizer));
    let (summary, rows) = go(1, config);
    summary.unwrap();
    for row in &rows {
        assert_eq!(row.usage_source.as_deref(), Some("local"));
        let completion = row.completion_tokens.unwrap();
        assert!((25..60).contains(&completion), "{completion} tokens");
        assert!(row.prompt_tokens.unwrap() > 20);
    }
}
