# franca-repro: the whole Franca paper as one DAG. Rules only call `franca <stage>` commands (franca/cli.py).
#   fetch -> shard -> dedup -> pretrain(stage 1..n) -> highres -> features -> rasa -> eval -> paper
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/dedup.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/rasa.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/paper.smk"


rule all:
    default_target: True
    input:
        # every output of the paper, so that one missing (an output added by a code change) reruns it
        rules.paper.output,


onstart:
    workflow_onstart()


onsuccess:
    workflow_onsuccess()


onerror:
    workflow_onerror()
