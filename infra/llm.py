"""The LLM backend the workers call: the built-in simulator, or an external OpenAI-compatible API.

Outputs the base URL (plain: it is not a secret) and a Secret key with the API key; the workers read
the key through ``secretKeyRef`` only.
"""

from __future__ import annotations

import pulumi
import pulumi_kubernetes as k8s

from common.stackconfig import StackConfig
from infra import kube as c

API_KEY_KEY = "api-key"
SIMULATOR_API_KEY = "sk-simulator"  # the simulator ignores keys; kept in the Secret for one code path
APP_UID = 10001  # the service image's user (Dockerfile)


class Llm(pulumi.ComponentResource):
    """``simulator``: Deployment + Service running ``python -m service.simulator``; ``external``: a Secret.

    Args: ``name``, ``cfg`` (section ``llm``), ``namespace``, ``external_api_key`` (secret config
    ``loadproof:llmApiKey``; default None, required when ``llm.mode`` is ``external``), ``opts``.
    Outputs ``base_url`` and the Secret holding the key.
    """

    base_url: str
    secret_name: pulumi.Output[str]
    api_key_key: str = API_KEY_KEY

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        namespace: pulumi.Input[str],
        external_api_key: pulumi.Input[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("loadproof:infra:Llm", name, None, opts)
        llm = cfg.llm
        if llm.mode == "external":
            if not llm.base_url:
                raise ValueError("llm.mode=external needs loadproof:llm.baseUrl")
            if external_api_key is None:
                raise ValueError("llm.mode=external needs `pulumi config set --secret loadproof:llmApiKey ...`")
            self.base_url = llm.base_url
            key: pulumi.Input[str] = external_api_key
        else:
            self.base_url = f"http://{name}.{cfg.namespace}.svc:{c.SIMULATOR_PORT}/v1"
            key = SIMULATOR_API_KEY
        secret = k8s.core.v1.Secret(
            f"{name}-api-key",
            metadata=c.metadata(f"{name}-api-key", namespace, "simulator"),
            string_data={API_KEY_KEY: key},
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["stringData", "data"]),
        )
        self.secret_name = secret.metadata.apply(lambda m: m.name or "")
        if llm.mode == "simulator":
            self._simulator(name, cfg, namespace)
        self.register_outputs({"base_url": self.base_url})

    def _simulator(self, name: str, cfg: StackConfig, namespace: pulumi.Input[str]) -> None:
        sim = cfg.llm.simulator
        sel = c.selector("simulator")
        env = {
            **cfg.simulator_env(),
            "LOADPROOF_SIM_HOST": "0.0.0.0",
            "LOADPROOF_SIM_PORT": str(c.SIMULATOR_PORT),
            # The simulator's injected timeouts hang for 2x the client's timeout.
            "LOADPROOF_LLM_TIMEOUT_S": str(cfg.llm.timeout_s),
        }
        c.check_settings(env, "simulator")
        container = k8s.core.v1.ContainerArgs(
            name="simulator",
            image=cfg.image,
            image_pull_policy=cfg.image_pull_policy,
            command=["python", "-m", "service.simulator"],
            env=c.env_list(env),
            ports=[k8s.core.v1.ContainerPortArgs(name="http", container_port=c.SIMULATOR_PORT)],
            resources=c.resources(sim.resources),
            security_context=c.container_security(),
            liveness_probe=c.http_probe("/healthz", c.SIMULATOR_PORT, period_s=15),
            readiness_probe=c.http_probe("/healthz", c.SIMULATOR_PORT, period_s=5),
            volume_mounts=[k8s.core.v1.VolumeMountArgs(name="tmp", mount_path="/tmp")],
        )
        k8s.apps.v1.Deployment(
            f"{name}-deployment",
            metadata=c.metadata(name, namespace, "simulator"),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                replicas=sim.replicas,
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=sel),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=c.labels("simulator")),
                    spec=k8s.core.v1.PodSpecArgs(
                        automount_service_account_token=False,
                        security_context=c.pod_security(APP_UID),
                        containers=[container],
                        volumes=[c.empty_dir("tmp")],
                    ),
                ),
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        c.cluster_service(f"{name}-service", name, namespace, "simulator", "http", c.SIMULATOR_PORT, parent=self)
