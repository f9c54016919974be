"""The deployment files checked without Docker (it does not run on the development machines).

Each test ties a file to the code it must agree with: a renamed setting, CLI command, compose
service, port or metric then fails here instead of in a half-started deployment. Files:
docker-compose.yml, Dockerfile, .dockerignore, prometheus/prometheus.yml and everything
``python -m grafana.dashboards`` generates under grafana/.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml

from grafana import dashboards
from stream_app.cli import build_parser
from stream_app.engine import Engine
from stream_app.settings import Settings
from stream_app.worker import build_metrics

from .conftest import readme_table_names

ROOT = Path(__file__).resolve().parents[1]
LOCALHOST = "127.0.0.1"
UID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}$")  # what Grafana accepts as a uid


# -- helpers -----------------------------------------------------------------------------------
def load_yaml(relative: str) -> dict:
    return yaml.safe_load((ROOT / relative).read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml("docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def workers(services: dict[str, dict]) -> dict[str, dict]:
    """Services that run streamrec itself (built from the Dockerfile here)."""
    return {name: s for name, s in services.items() if "build" in s}


def environment(service: dict) -> dict[str, str]:
    """A service's environment as strings, whichever compose syntax it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    """Settings exactly as the container would read them: from the environment only."""
    for key in [k for k in os.environ if k.upper().startswith("STREAMREC_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def streamrec_vars(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("STREAMREC_")}


def published(service: dict) -> list[tuple[str | None, str]]:
    """(host ip, host port) of every published port; host ip None when it binds all."""
    result = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            result.append((port.get("host_ip"), str(port.get("published"))))
            continue
        parts = str(port).split(":")
        result.append((parts[0], parts[1]) if len(parts) == 3 else (None, parts[0]))
    return result


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


# -- compose services --------------------------------------------------------------------------
def test_compose_runs_the_whole_stack(services):
    """Kafka, at least one worker, Prometheus and Grafana: the stack the README promises."""
    assert {"kafka", "prometheus", "grafana"} <= set(services)
    assert workers(services), "no service is built from the Dockerfile"


def test_the_default_stack_runs_one_worker_and_the_scale_out_profile_two(services):
    """A plain `docker compose up` runs one worker; the second is opt-in, and both share
    their item rows (README, "Several workers")."""
    default = [name for name, service in workers(services).items()
               if not service.get("profiles")]
    opt_in = [name for name, service in workers(services).items()
              if service.get("profiles") == ["scale-out"]]
    assert len(default) == 1 and len(opt_in) == 1
    for service in workers(services).values():
        assert service["environment"]["STREAMREC_SHARE_ITEMS"] == "true"


def test_images_are_pinned_and_builds_exist(services):
    """An unpinned image changes under us; a build context without a Dockerfile never builds."""
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get(
                "dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: {context / dockerfile} missing"
        else:
            repository, _, tag = service["image"].rpartition(":")
            assert repository and tag and tag != "latest", f"{name}: pin {service['image']}"


def test_published_ports_bind_localhost_only(services):
    """Nothing in this stack has authentication worth the name: never expose it beyond the
    host (Docker's iptables rules bypass host firewalls for 0.0.0.0 ports)."""
    ports = [(name, ip, port) for name, s in services.items() for ip, port in published(s)]
    assert ports, "Grafana at least must be reachable from the host"
    for name, ip, port in ports:
        assert ip == LOCALHOST, f"{name} publishes {port} on {ip or 'all interfaces'}"


def test_volume_mount_sources_exist(compose, services):
    """A missing bind-mount source makes Docker create an empty directory in its place."""
    named = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} missing"
            else:
                assert source in named, f"{name}: volume {source} not declared"


# -- workers ----------------------------------------------------------------------------------
def test_worker_environment_is_valid_settings(services, monkeypatch):
    """Every STREAMREC_* variable must name a Settings field (pydantic-settings ignores
    unknown ones silently) and its value must validate."""
    fields = {name.upper() for name in Settings.model_fields}
    for name, service in services.items():
        env = streamrec_vars(environment(service))
        unknown = {key for key in env if key.removeprefix("STREAMREC_") not in fields}
        assert not unknown, f"{name}: not streamrec settings: {sorted(unknown)}"
        if env:
            settings_from(env, monkeypatch)  # raises ValidationError on a bad value


def test_dockerfile_environment_is_valid_settings(monkeypatch):
    """The image's own STREAMREC_* defaults obey the same rule as compose's."""
    env = streamrec_vars(dockerfile_env())
    fields = {name.upper() for name in Settings.model_fields}
    assert env and all(key.removeprefix("STREAMREC_") in fields for key in env), env
    assert settings_from(env, monkeypatch).metrics_host == "0.0.0.0"


def test_worker_command_is_a_streamrec_command(services):
    """The command must parse with the real CLI parser and be the `worker` command."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, service in workers(services).items():
        command = service["command"]
        command = shlex.split(command) if isinstance(command, str) else command
        assert command[0] in scripts, f"{name}: {command[0]} is not an installed script"
        try:
            args = build_parser().parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{' '.join(command)}` is not a valid streamrec command line")
        assert args.command == "worker", name


def test_workers_reach_kafka_inside_the_network(services, monkeypatch):
    """The broker the workers use must be a compose service and an advertised listener."""
    kafka_env = environment(services["kafka"])
    advertised = {listener.split("://", 1)[1]
                  for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    for name, service in workers(services).items():
        settings = settings_from(streamrec_vars(environment(service)), monkeypatch)
        assert not settings.embedded, f"{name} would start the embedded broker"
        for server in settings.bootstrap_servers:
            assert server.split(":")[0] in services, f"{name}: {server} is no service"
            assert server in advertised, f"{name}: {server} not in {sorted(advertised)}"


def test_workers_keep_state_on_their_own_volume(services, monkeypatch):
    """State (tables, checkpoints) must outlive the container and not be shared by two
    workers (RocksDB takes a lock per database)."""
    seen = set()
    for name, service in workers(services).items():
        data_dir = str(settings_from(streamrec_vars(environment(service)), monkeypatch).data_dir)
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}
        assert data_dir in mounts, f"{name}: {data_dir} is not a volume"
        assert mounts[data_dir] not in seen, f"{name} shares {mounts[data_dir]}"
        seen.add(mounts[data_dir])


def test_worker_healthcheck_probes_the_metrics_port(services, monkeypatch):
    """By the container's own address, as Prometheus reaches it: a probe of 127.0.0.1 passed
    while metrics bound to the loopback alone went unscraped."""
    for name, service in workers(services).items():
        settings = settings_from(streamrec_vars(environment(service)), monkeypatch)
        probe = " ".join(service["healthcheck"]["test"])
        assert f"{{socket.gethostname()}}:{settings.metrics_port}/metrics" in probe, name
        assert "127.0.0.1" not in probe and "localhost" not in probe, name


def test_compose_waits_for_a_workers_graceful_stop(services, monkeypatch):
    """Docker kills a container stop_grace_period after its SIGTERM: it must be longer than
    the worker's own bound on its graceful stop (its last checkpoint), or the kill comes
    first, and exit status 75 (the stop overran) is never seen."""
    for name, service in workers(services).items():
        env = {**streamrec_vars(dockerfile_env()), **streamrec_vars(environment(service))}
        settings = settings_from(env, monkeypatch)
        grace = service["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) > settings.shutdown_timeout_s, name
        assert service["restart"] in ("unless-stopped", "always", "on-failure"), name


def test_kafka_is_a_single_kraft_node(services):
    """KRaft needs a valid cluster id (a base64 UUID) and a controller listener that exists;
    auto topic creation stays off because the workers create their topics."""
    env = environment(services["kafka"])
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    node, controller = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert node == env["KAFKA_NODE_ID"]
    port = controller.split(":")[1]
    assert f"{env['KAFKA_CONTROLLER_LISTENER_NAMES']}://:{port}" in env["KAFKA_LISTENERS"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


# -- the image ----------------------------------------------------------------------------------
def test_dockerfile_installs_cpu_torch_under_the_constraints():
    """The CUDA build of torch is several GB; the CPU index plus the pin avoids it."""
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for instruction, args in instructions if instruction == "FROM"]
    assert bases and all(base == "python:3.11-slim" for base in bases)
    installs = [args for instruction, args in instructions
                if instruction == "RUN" and "pip install" in args]
    assert installs and all("-c constraints.txt" in args for args in installs)
    assert all("--extra-index-url https://download.pytorch.org/whl/cpu" in a for a in installs)
    assert "torch==" in (ROOT / "constraints.txt").read_text()


def test_dockerfile_builds_hnswlib_for_any_x86_64_cpu():
    """hnswlib comes as a source distribution whose build adds -march=native unless
    HNSWLIB_NO_NATIVE is set: an image built on a CPU with AVX-512 died with SIGILL on one
    without. The build stage sets it before any pip install, and keeps no wheel cache."""
    instructions = dockerfile_instructions()
    first_install = next(n for n, (instruction, args) in enumerate(instructions)
                         if instruction == "RUN" and "pip install" in args)
    env = " ".join(args for instruction, args in instructions[:first_install]
                   if instruction == "ENV")
    assert "HNSWLIB_NO_NATIVE=1" in env.split() and "PIP_NO_CACHE_DIR=1" in env.split()


def test_dockerfile_copies_only_existing_unignored_paths():
    """A COPY of a path that is missing or excluded by .dockerignore fails the build."""
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [args.split() for instruction, args in dockerfile_instructions()
              if instruction == "COPY" and not args.startswith("--from")]
    sources = [source for args in copies for source in args[:-1]]
    assert "pyproject.toml" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source



def test_dockerfile_copies_every_package_the_project_installs():
    """pyproject's package list finds what the build context holds: a package left out of
    the COPY lines installs without error and fails at the first import. So the image gets
    every package of the list, and the worker command imports with those alone (a fresh
    interpreter without the editable install, the copied packages and the site-packages on
    its path)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(path.name for path in ROOT.iterdir()
                      if (path / "__init__.py").exists()
                      and any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns))
    copies = [args.split() for instruction, args in dockerfile_instructions()
              if instruction == "COPY" and not args.startswith("--from")]
    copied = sorted(source for args in copies for source in args[:-1]
                    if (ROOT / source / "__init__.py").exists())
    assert copied == packages
    with tempfile.TemporaryDirectory() as image:
        for package in copied:
            (Path(image) / package).symlink_to(ROOT / package)
        path = os.pathsep.join([image, sysconfig.get_paths()["purelib"]])
        done = subprocess.run([sys.executable, "-S", "-c", "import stream_app.cli, "
                               "stream_app.worker, evaluation.cli"],
                              cwd=image, env={**os.environ, "PYTHONPATH": path},
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

# -- Prometheus -----------------------------------------------------------------------------------
def test_prometheus_scrapes_every_worker(services, monkeypatch):
    """The scrape targets are exactly the worker services on their metrics port: the default
    stack's as fixed targets (one that is down shows), those of a profile found by their
    names (a worker of an unused profile adds no target, so no scrape is always down)."""
    config = load_yaml("prometheus/prometheus.yml")
    (job,) = config["scrape_configs"]
    fixed = {target for group in job["static_configs"] for target in group["targets"]}
    found = {f"{name}:{lookup['port']}" for lookup in job["dns_sd_configs"]
             for name in lookup["names"]}
    assert all(lookup["type"] == "A" for lookup in job["dns_sd_configs"])
    expected: dict[bool, set[str]] = {True: set(), False: set()}
    for name, service in workers(services).items():
        settings = settings_from(streamrec_vars(environment(service)), monkeypatch)
        expected[bool(service.get("profiles"))].add(f"{name}:{settings.metrics_port}")
    assert (fixed, found) == (expected[False], expected[True])


def relabelled(rules: list[dict], labels: dict[str, str]) -> dict[str, str]:
    """Prometheus's `replace` relabelling (its default action): the source labels joined by
    ``;``, matched by the whole regex, set ``target_label`` to the expanded replacement."""
    labels = dict(labels)
    for rule in rules:
        assert rule.get("action", "replace") == "replace"
        joined = rule.get("separator", ";").join(labels.get(name, "")
                                                  for name in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), joined)
        if match:
            replacement = re.sub(r"\$\{(\d+)\}", r"\\\1", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
    return labels


def test_a_discovered_worker_is_named_by_its_service_not_its_address():
    """Dashboards label series by `instance`: a container's address changes when compose
    makes it again, its service name does not."""
    (job,) = load_yaml("prometheus/prometheus.yml")["scrape_configs"]
    discovered = {"__meta_dns_name": "worker-2", "__address__": "172.18.0.7:9464"}
    assert relabelled(job["relabel_configs"], discovered)["instance"] == "worker-2:9464"
    fixed = {"__address__": "127.0.0.1:9464"}  # no name: a target not found by DNS
    assert "instance" not in relabelled(job["relabel_configs"], fixed)


def test_prometheus_loads_the_mounted_config(services):
    service = services["prometheus"]
    flags = dict(flag.split("=", 1) for flag in service["command"] if "=" in flag)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert mounts[flags["--config.file"]] == "./prometheus/prometheus.yml"
    assert flags["--storage.tsdb.path"] in mounts, "metrics history would die with the container"


# -- Grafana ------------------------------------------------------------------------------------
def test_grafana_mounts_the_generated_provisioning(services):
    service = services["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert mounts[dashboards.DASHBOARDS_MOUNT] == "./grafana/dashboards"
    env = environment(service)
    assert (env["GF_AUTH_ANONYMOUS_ENABLED"], env["GF_AUTH_ANONYMOUS_ORG_ROLE"]) == ("true",
                                                                                    "Viewer")


def test_grafana_datasource_points_at_the_prometheus_service(services):
    config = load_yaml("grafana/provisioning/datasources/prometheus.yml")
    (source,) = config["datasources"]
    host, port = source["url"].removeprefix("http://").split(":")
    assert host in services and services[host]["image"].startswith("prom/prometheus")
    assert port == "9090"  # Prometheus' listen port inside its container
    assert source["uid"] == dashboards.DATASOURCE_UID


def test_generated_files_are_up_to_date():
    """Run `python -m grafana.dashboards` after changing grafana/dashboards.py."""
    files = dashboards.render_all()
    assert dashboards.render_all() == files, "generation is not deterministic"
    assert dashboards.stale(files) == []


def test_uids_are_unique_and_valid():
    """Grafana keys dashboards and data sources by uid: a clash silently replaces one."""
    uids = [build()["uid"] for build in dashboards.DASHBOARDS.values()]
    uids.append(dashboards.DATASOURCE_UID)
    assert len(uids) == len(set(uids))
    assert all(UID_PATTERN.match(uid) for uid in uids), uids


@pytest.mark.parametrize("build", dashboards.DASHBOARDS.values())
def test_a_series_per_worker_is_named_by_its_worker(build):
    """With several workers a query that keeps the instance label draws one series each;
    a legend without {{instance}} gives them all one name. Queries summed over the workers
    (sum, or sum by labels other than instance) draw one series and need none."""
    for panel in build()["panels"]:
        for target in panel["targets"]:
            summed = re.search(r"\bsum(?: by \(([^)]*)\))? ?\(", target["expr"])
            per_worker = summed is None or "instance" in (summed.group(1) or "")
            if per_worker:
                assert "{{instance}}" in target["legendFormat"], (panel["title"], target)


@pytest.mark.parametrize("build", dashboards.DASHBOARDS.values())
def test_panels_are_numbered_and_use_the_provisioned_datasource(build):
    panels = build()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], panel["title"]
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s["uid"] == dashboards.DATASOURCE_UID for s in sources), panel["title"]


# -- PromQL metric names against the metrics bundle ---------------------------------------------
SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
                   "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "summary": ("", "_sum", "_count", "_created")}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def exposed_names(registry) -> set[str]:
    """Sample names a registry exposes, including labelled metrics with no child yet."""
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, label
    names (in matchers, ``by``/``without``/``on``/``ignoring`` lists), durations or keywords."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)
    return {name for name in names if name.lower() not in PROMQL_WORDS}


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="x", le!="1"}[1m])))',
     {"a_bucket"}),
    ("sum without (instance) (rate(a_total[5m] offset 1m)) / on (job) b", {"a_total", "b"}),
    ("max(up) > bool 0.5 and c", {"up", "c"}),
    ("1e3 * d:recorded:rate5m", {"d:recorded:rate5m"}),
])
def test_promql_metric_names(expr, names):
    """The extractor below the dashboard test: if it found nothing, that test would pass
    vacuously."""
    assert promql_metric_names(expr) == names


def test_exposed_names_cover_labelled_metrics_without_samples():
    names = exposed_names(build_metrics(Engine(Settings())).registry)
    assert {"streamrec_events_total", "streamrec_dead_letters_total",
            "streamrec_request_latency_seconds_bucket", "streamrec_users"} <= names
    assert "streamrec_events" not in names  # the family name is not a sample name


def every_metric():
    """A worker's metrics bundle, with the gauges STREAMREC_SHARE_ITEMS and the batch
    intakes of events and training messages add."""
    from stream_app.checkpoint_acks import AcksAfterCheckpoint
    from stream_app.confirmed_acks import AcksAfterDelivery
    from stream_app.item_sharing import ItemSharing

    engine = Engine(Settings())
    metrics = build_metrics(engine)
    ItemSharing(engine.settings, engine, frozenset, print).export(metrics)
    AcksAfterCheckpoint(None).export(metrics)
    AcksAfterDelivery(print).export(metrics)
    return metrics


def test_the_readme_documents_every_metric():
    """Each metric the worker exports has a row of the README's metrics table, by its name
    (counters with their _total) or as a suffix beside the first name of its row
    (`streamrec_dr_m_steps`, `_last_m_step_seconds`)."""
    documented = readme_table_names(r"streamrec_[a-z0-9_]+", r"_[a-z0-9_]+")
    families = every_metric().registry.collect()
    exported = {family.name + ("_total" if family.type == "counter" else "")
                for family in families}
    assert exported and exported - documented == set()


@pytest.mark.parametrize("name, build", dashboards.DASHBOARDS.items())
def test_dashboard_metrics_exist_in_the_bundle(name, build):
    """A dashboard query naming a metric the worker does not export shows "No data" forever."""
    exported = exposed_names(every_metric().registry) | {"up"}  # up: Prometheus's own
    used = set().union(*(promql_metric_names(e) for e in dashboards.expressions(build())))
    assert used, f"{name}: no metric names found"
    assert used <= exported, f"{name}: not exported: {sorted(used - exported)}"


def test_the_dashboard_shows_a_worker_that_is_down():
    """A dead worker's panels only went quiet; Prometheus's ``up`` of the workers' job says
    it, per worker, in the job prometheus.yml scrapes them under."""
    jobs = [job["job_name"] for job in
            yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
            ["scrape_configs"]]
    ups = [e for e in dashboards.expressions(dashboards.overview())
           if promql_metric_names(e) == {"up"}]
    assert ups == [f'up{{job="{jobs[0]}"}}'] and len(jobs) == 1


def test_stat_panels_of_fractions_are_not_rounded_to_whole_numbers():
    """α0 is about 0.01, a bias weight 0.25, a lead 0.7 standard errors, a build 0.4 s: a
    stat panel fixed to 0 decimals showed them as 0 or 1."""
    fractions = {"streamrec_alpha0", "streamrec_serving_bias_weight", "streamrec_serving_lead",
                 "streamrec_index_build_seconds"}
    panels = [panel for build in dashboards.DASHBOARDS.values()
              for panel in build()["panels"] if panel["type"] == "stat"]
    showing = [panel for panel in panels
               if any(name in target["expr"] for target in panel["targets"]
                      for name in fractions)]
    assert len(showing) == 3
    assert all(panel["fieldConfig"]["defaults"].get("decimals") != 0 for panel in showing)
    assert any(panel["fieldConfig"]["defaults"].get("decimals") == 0 for panel in panels)
