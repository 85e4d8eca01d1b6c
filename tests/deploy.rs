//! The deployment files in `deploy/` stay usable: the example configs (and the one inside the
//! Kubernetes ConfigMap) load with sandgate's own config loader, the Kubernetes manifests agree
//! with each other and with that config, and the systemd unit has what the guide says it has.
//! No network, no server: files only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sandgate::config::Config;
use serde::Deserialize as _;
use serde_yaml_ng::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// One YAML document and the file it came from.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// Every document of every `.yaml` / `.yml` file under deploy/kubernetes, in file order.
fn k8s_docs() -> Vec<Doc> {
    let dir = deploy_dir().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    let mut docs = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for de in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(de).unwrap_or_else(|e| panic!("{file}: {e}"));
            if value.is_null() {
                continue;
            }
            docs.push(Doc {
                file: file.clone(),
                value,
            });
        }
    }
    docs
}

/// The one document of `kind` (panics when there are none or several).
fn one<'a>(docs: &'a [Doc], kind: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found[0]
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v:?}"))
}

fn seq_of<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what} is not a list: {v:?}"))
}

/// A label map as strings.
fn labels(v: &Value, what: &str) -> BTreeMap<String, String> {
    v.as_mapping()
        .unwrap_or_else(|| panic!("{what} is not a map: {v:?}"))
        .iter()
        .map(|(k, v)| (str_of(k, what).to_string(), str_of(v, what).to_string()))
        .collect()
}

/// True when every label of `selector` is in `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The Deployment's only container.
fn container(deployment: &Doc) -> &Value {
    let containers = seq_of(
        &deployment.value["spec"]["template"]["spec"]["containers"],
        "containers",
    );
    assert_eq!(containers.len(), 1, "one sandgate container per pod");
    &containers[0]
}

/// The container's ports: name → number.
fn container_ports(c: &Value) -> BTreeMap<String, u64> {
    seq_of(&c["ports"], "ports")
        .iter()
        .map(|p| {
            let number = p["containerPort"].as_u64().expect("containerPort");
            let name = p["name"].as_str().unwrap_or_default().to_string();
            (name, number)
        })
        .collect()
}

/// A port reference (a number, or the name of a container port) as a number.
fn resolve_port(reference: &Value, ports: &BTreeMap<String, u64>, what: &str) -> u64 {
    match reference {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(name) => *ports
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no container port named {name}")),
        other => panic!("{what}: not a port: {other:?}"),
    }
}

/// The volume mounted at `mount` (the longest mount path that contains `path`) and the
/// volume's definition.
fn volume_for<'a>(deployment: &'a Doc, path: &str) -> (&'a str, &'a Value) {
    let pod = &deployment.value["spec"]["template"]["spec"];
    let mounts = seq_of(&container(deployment)["volumeMounts"], "volumeMounts");
    let mount = mounts
        .iter()
        .filter(|m| {
            let at = str_of(&m["mountPath"], "mountPath").trim_end_matches('/');
            path.strip_prefix(at)
                .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|m| str_of(&m["mountPath"], "mountPath").len())
        .unwrap_or_else(|| panic!("{path} is on no volume: the root filesystem is read-only"));
    let name = str_of(&mount["name"], "volumeMounts[].name");
    let volume = seq_of(&pod["volumes"], "volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
    (str_of(&mount["mountPath"], "mountPath"), volume)
}

/// The ConfigMap's sandgate.toml, loaded by sandgate's config loader from a temporary file.
fn configmap_config(docs: &[Doc]) -> Config {
    let cm = one(docs, "ConfigMap");
    let text = str_of(
        &cm.value["data"]["sandgate.toml"],
        "ConfigMap data.sandgate.toml",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandgate.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{}: sandgate.toml does not load: {e}", cm.file))
}

#[test]
fn manifests_hold_every_kind_in_one_namespace() {
    let docs = k8s_docs();
    let kinds: BTreeSet<&str> = docs.iter().map(Doc::kind).collect();
    for kind in [
        "Deployment",
        "Service",
        "Secret",
        "ConfigMap",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/kubernetes");
    }
    let namespace = docs
        .iter()
        .find(|d| d.kind() == "Namespace")
        .map(|d| d.name().to_string());
    for d in &docs {
        assert!(
            d.value["apiVersion"]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "{}: {} has no apiVersion",
            d.file,
            d.kind()
        );
        assert!(!d.kind().is_empty(), "{}: a document has no kind", d.file);
        assert!(!d.name().is_empty(), "{}: {} has no name", d.file, d.kind());
        if d.kind() != "Namespace" {
            if let Some(ns) = &namespace {
                assert_eq!(
                    d.value["metadata"]["namespace"].as_str(),
                    Some(ns.as_str()),
                    "{}: {} {} is not in namespace {ns}",
                    d.file,
                    d.kind(),
                    d.name()
                );
            }
        }
    }
}

#[test]
fn deployment_env_uses_the_keys_the_secret_defines() {
    let docs = k8s_docs();
    let secrets: BTreeMap<&str, BTreeSet<String>> = docs
        .iter()
        .filter(|d| d.kind() == "Secret")
        .map(|d| {
            let mut keys = BTreeSet::new();
            for field in ["stringData", "data"] {
                if let Some(m) = d.value[field].as_mapping() {
                    keys.extend(m.keys().map(|k| str_of(k, "Secret key").to_string()));
                }
            }
            (d.name(), keys)
        })
        .collect();

    let deployment = one(&docs, "Deployment");
    let c = container(deployment);
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut env_names = BTreeSet::new();
    for e in c["env"]
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let name = str_of(&e["name"], "env[].name");
        env_names.insert(name.to_string());
        let Some(r) = e["valueFrom"]["secretKeyRef"].as_mapping() else {
            continue;
        };
        let secret = str_of(&r[&Value::from("name")], "secretKeyRef.name");
        let key = str_of(&r[&Value::from("key")], "secretKeyRef.key");
        let defined = secrets.get(secret).unwrap_or_else(|| {
            panic!("env {name} refers to Secret {secret}, which is not defined")
        });
        assert!(
            defined.contains(key),
            "env {name} refers to key {key} of Secret {secret}, which defines {defined:?}"
        );
        used.entry(secret.to_string())
            .or_default()
            .insert(key.to_string());
    }
    for e in c["envFrom"]
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if let Some(secret) = e["secretRef"]["name"].as_str() {
            let defined = secrets
                .get(secret)
                .unwrap_or_else(|| panic!("envFrom refers to Secret {secret}, not defined"));
            env_names.extend(defined.iter().cloned());
            used.entry(secret.to_string())
                .or_default()
                .extend(defined.iter().cloned());
        }
    }
    for var in ["SANDGATE_KEK", "SANDGATE_STORE_URL"] {
        assert!(env_names.contains(var), "the Deployment does not set {var}");
    }
    // No Secret key that nothing reads (a typo on one side or the other).
    for (secret, keys) in &secrets {
        let read = used.get(*secret).cloned().unwrap_or_default();
        for key in keys {
            assert!(
                read.contains(key),
                "Secret {secret} defines {key}, which the Deployment never reads"
            );
        }
    }
}

#[test]
fn service_pdb_and_probes_match_the_pods() {
    let docs = k8s_docs();
    let deployment = one(&docs, "Deployment");
    let spec = &deployment.value["spec"];
    let pod_labels = labels(&spec["template"]["metadata"]["labels"], "pod labels");
    let selector = labels(&spec["selector"]["matchLabels"], "Deployment selector");
    assert!(
        selects(&selector, &pod_labels),
        "the Deployment's selector does not match its pods"
    );
    assert!(
        spec["replicas"].as_u64().unwrap_or(1) >= 2,
        "one replica is no cluster"
    );

    let c = container(deployment);
    let ports = container_ports(c);

    let service = one(&docs, "Service");
    let svc = &service.value["spec"];
    assert!(
        selects(&labels(&svc["selector"], "Service selector"), &pod_labels),
        "the Service's selector does not match the pods"
    );
    assert_eq!(svc["type"].as_str(), Some("LoadBalancer"));
    assert_eq!(svc["externalTrafficPolicy"].as_str(), Some("Local"));
    let service_ports = seq_of(&svc["ports"], "Service ports");
    assert!(!service_ports.is_empty());
    let mut public = false;
    for p in service_ports {
        assert_eq!(p["protocol"].as_str().unwrap_or("TCP"), "TCP");
        let target = resolve_port(
            p.get("targetPort").unwrap_or(&p["port"]),
            &ports,
            "Service targetPort",
        );
        assert!(
            ports.values().any(|&n| n == target),
            "Service targetPort {target} is not a container port ({ports:?})"
        );
        public |= p["port"].as_u64() == Some(443);
    }
    assert!(public, "the Service does not listen on 443");

    let pdb = one(&docs, "PodDisruptionBudget");
    assert!(
        selects(
            &labels(
                &pdb.value["spec"]["selector"]["matchLabels"],
                "PDB selector"
            ),
            &pod_labels
        ),
        "the PodDisruptionBudget selects no sandgate pod"
    );

    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        assert!(get.is_mapping(), "{probe} is not an httpGet probe");
        let port = resolve_port(&get["port"], &ports, probe);
        assert!(ports.values().any(|&n| n == port), "{probe} port {port}");
    }
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
}

#[test]
fn configmap_config_loads_and_fits_the_deployment() {
    let docs = k8s_docs();
    let config = configmap_config(&docs);
    let deployment = one(&docs, "Deployment");
    let c = container(deployment);
    let ports = container_ports(c);

    assert!(
        !config.orchestrator.enabled,
        "the Deployment runs gateway-only nodes"
    );
    assert!(config.store.url.is_some(), "cluster mode needs [store] url");
    assert!(
        !config.tls.dev_cert,
        "production pods use the mounted certificate"
    );

    // The TLS listener is the port the Service targets; telemetry is what the probes reach,
    // which loopback is not.
    let service = one(&docs, "Service");
    let targets: Vec<u64> = seq_of(&service.value["spec"]["ports"], "Service ports")
        .iter()
        .map(|p| resolve_port(&p["targetPort"], &ports, "targetPort"))
        .collect();
    assert!(
        targets.contains(&u64::from(config.gateway.listen.port())),
        "[gateway] listen {} is not the Service's targetPort {targets:?}",
        config.gateway.listen
    );
    assert!(config.gateway.listen.ip().is_unspecified());
    assert_eq!(config.gateway.public_port, 443);
    let probe_port = resolve_port(&c["readinessProbe"]["httpGet"]["port"], &ports, "probe");
    assert_eq!(u64::from(config.telemetry.listen.port()), probe_port);
    assert!(
        !config.telemetry.listen.ip().is_loopback(),
        "httpGet probes cannot reach a loopback telemetry listener"
    );

    // --config names the ConfigMap's key on the ConfigMap's volume.
    let args: Vec<&str> = seq_of(&c["args"], "args")
        .iter()
        .map(|a| str_of(a, "args[]"))
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("the container runs `serve --config PATH`");
    assert_eq!(args.get(at.wrapping_sub(1)), Some(&"serve"));
    let config_path = args[at + 1];
    let (mount, volume) = volume_for(deployment, config_path);
    let cm = one(&docs, "ConfigMap");
    assert_eq!(volume["configMap"]["name"].as_str(), Some(cm.name()));
    let key = config_path[mount.len()..].trim_start_matches('/');
    assert!(
        cm.value["data"][key].is_string(),
        "--config {config_path}: the ConfigMap has no key {key}"
    );

    // The certificate files are a kubernetes.io/tls Secret's tls.crt and tls.key.
    for (file, expected) in [
        (&config.tls.cert_file, "tls.crt"),
        (&config.tls.key_file, "tls.key"),
    ] {
        let file = file.to_str().unwrap();
        let (_, volume) = volume_for(deployment, file);
        assert!(
            volume["secret"]["secretName"].is_string(),
            "{file} is not on a Secret volume"
        );
        assert!(file.ends_with(expected), "{file}: expected {expected}");
    }

    // data_dir is writable (an emptyDir under a read-only root) and strictly inside the mount,
    // so that sandgate owns it and can set its mode.
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    let data_dir = config.store.data_dir.to_str().unwrap();
    let (mount, volume) = volume_for(deployment, data_dir);
    assert!(
        volume["emptyDir"].is_mapping(),
        "data_dir is not on an emptyDir"
    );
    assert_ne!(data_dir.trim_end_matches('/'), mount.trim_end_matches('/'));

    // Kubernetes waits long enough for the preStop pause plus sandgate's own drain.
    let pod = &deployment.value["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        grace > pause + config.gateway.shutdown_grace.as_secs(),
        "terminationGracePeriodSeconds {grace} <= preStop {pause} + shutdown_grace_secs {}",
        config.gateway.shutdown_grace.as_secs()
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
}

// ---------------------------------------------------------------------------------------------
// systemd

/// A unit file's sections, in order, each with its `key=value` entries in order (keys repeat).
type Unit = Vec<(String, Vec<(String, String)>)>;

/// Parses systemd's INI dialect: `[Section]`, `Key=Value`, `#` and `;` comments, trailing `\`
/// continuations.
fn parse_unit(text: &str, file: &str) -> Unit {
    let mut unit: Unit = Vec::new();
    let mut pending = String::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            unit.push((name.to_string(), Vec::new()));
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{file}:{}: not `key=value`: {raw}", n + 1));
        let (_, entries) = unit
            .last_mut()
            .unwrap_or_else(|| panic!("{file}:{}: an entry before any [Section]", n + 1));
        entries.push((key.trim().to_string(), value.trim().to_string()));
    }
    assert!(pending.is_empty(), "{file}: ends in a continuation");
    unit
}

fn section<'a>(unit: &'a Unit, name: &str) -> &'a [(String, String)] {
    let found: Vec<_> = unit.iter().filter(|(n, _)| n == name).collect();
    assert_eq!(found.len(), 1, "expected one [{name}] section");
    &found[0].1
}

/// The last value of `key` (systemd's rule for single-valued settings).
fn entry<'a>(entries: &'a [(String, String)], key: &str) -> Option<&'a str> {
    entries
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A systemd time span such as `45s`, `45`, `2min`, `1min 30s`.
fn timespan(value: &str) -> Duration {
    let mut total = 0;
    for part in value.split_whitespace() {
        let digits = part.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let n: u64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("not a time span: {value}"));
        total += match &part[digits.len()..] {
            "" | "s" | "sec" => n,
            "m" | "min" => n * 60,
            "h" => n * 3600,
            other => panic!("unit {other} in {value}"),
        };
    }
    Duration::from_secs(total)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn load_systemd_config(name: &str) -> Config {
    let path = deploy_dir().join("systemd").join(name);
    Config::load(&path).unwrap_or_else(|e| panic!("{name} does not load: {e}"))
}

#[test]
fn example_configs_load() {
    let gateway = load_systemd_config("sandgate-gateway.toml");
    assert!(!gateway.orchestrator.enabled, "a gateway-only node");
    let orchestrator = load_systemd_config("sandgate-orchestrator.toml");
    assert!(orchestrator.orchestrator.enabled, "an orchestrator node");

    for config in [&gateway, &orchestrator] {
        assert!(config.store.url.is_some(), "cluster mode: [store] url");
        assert!(
            !config.tls.dev_cert,
            "production nodes use real certificates"
        );
        assert_eq!(config.gateway.public_port, 443);
        assert!(
            config.telemetry.listen.ip().is_loopback(),
            "metrics stay on loopback on a host"
        );
    }
    assert_eq!(
        gateway.gateway.base_domain, orchestrator.gateway.base_domain,
        "one cluster, one base domain"
    );
    assert_eq!(gateway.store.data_dir, orchestrator.store.data_dir);
}

#[test]
fn systemd_unit_is_complete() {
    let dir = deploy_dir().join("systemd");
    let unit = parse_unit(&read(&dir.join("sandgate.service")), "sandgate.service");
    let names: Vec<&str> = unit.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Unit", "Service", "Install"]);
    assert!(entry(section(&unit, "Unit"), "Description").is_some());
    assert!(entry(section(&unit, "Install"), "WantedBy").is_some());

    let service = section(&unit, "Service");
    let exec = entry(service, "ExecStart").expect("ExecStart");
    let (binary, args) = exec.split_once(' ').expect("ExecStart has arguments");
    assert!(binary.starts_with('/'), "ExecStart needs an absolute path");
    let mut words = args.split_whitespace();
    assert_eq!(words.next(), Some("serve"), "{exec}");
    assert_eq!(words.next(), Some("--config"), "{exec}");
    let config_path = words.next().expect("serve --config PATH");
    assert!(config_path.ends_with("sandgate.toml"), "{exec}");

    // The env file ships as <name>.example beside the unit, with both secrets.
    let env_file = entry(service, "EnvironmentFile").expect("EnvironmentFile");
    let env_file = env_file.trim_start_matches('-');
    let example = format!(
        "{}.example",
        Path::new(env_file).file_name().unwrap().to_string_lossy()
    );
    let env = read(&dir.join(&example));
    let vars: BTreeSet<&str> = env
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once('=').expect("KEY=value").0)
        .collect();
    for var in ["SANDGATE_KEK", "SANDGATE_STORE_URL"] {
        assert!(vars.contains(var), "{example} does not set {var}");
    }

    assert_eq!(entry(service, "Restart"), Some("on-failure"));
    assert_eq!(entry(service, "LimitNOFILE"), Some("1048576"));
    assert_eq!(entry(service, "ProtectSystem"), Some("strict"));
    assert_eq!(entry(service, "NoNewPrivileges"), Some("yes"));
    assert!(entry(service, "User").is_some_and(|u| u != "root"));
    assert!(
        entry(service, "AmbientCapabilities").is_some_and(|c| c.contains("CAP_NET_BIND_SERVICE"))
    );
    assert!(entry(service, "ExecReload").is_some_and(|r| r.contains("-HUP")));
    assert_eq!(entry(service, "KillSignal"), Some("SIGTERM"));

    // The data dir of both example configs is writable under ProtectSystem=strict.
    let writable: Vec<&str> = service
        .iter()
        .filter(|(k, _)| k == "ReadWritePaths")
        .flat_map(|(_, v)| v.split_whitespace())
        .map(|p| p.trim_start_matches('-'))
        .collect();
    for name in ["sandgate-gateway.toml", "sandgate-orchestrator.toml"] {
        let config = load_systemd_config(name);
        let data_dir = config.store.data_dir.to_str().unwrap();
        assert!(
            writable.iter().any(|w| Path::new(data_dir).starts_with(w)),
            "{name}: data_dir {data_dir} is not in ReadWritePaths {writable:?}"
        );
        // systemd must not SIGKILL the drain (and, on orchestrator nodes, the sandboxes' own
        // grace period after it).
        let stop = timespan(entry(service, "TimeoutStopSec").expect("TimeoutStopSec"));
        let needed = config.gateway.shutdown_grace
            + if config.orchestrator.enabled {
                config.orchestrator.grace
            } else {
                Duration::ZERO
            };
        assert!(
            stop > needed,
            "{name}: TimeoutStopSec {stop:?} <= shutdown {needed:?}"
        );
    }
}

#[test]
fn orchestrator_drop_in_runs_as_root() {
    let path = deploy_dir().join("systemd/sandgate.service.d/orchestrator.conf");
    let unit = parse_unit(&read(&path), "orchestrator.conf");
    let names: Vec<&str> = unit.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Service"]);
    let service = section(&unit, "Service");
    assert_eq!(entry(service, "User"), Some("root"));
    let caps = entry(service, "CapabilityBoundingSet").unwrap_or_default();
    for cap in ["CAP_SETUID", "CAP_SETGID", "CAP_KILL"] {
        assert!(caps.contains(cap), "the process driver needs {cap}");
    }
}
