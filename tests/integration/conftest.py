import pytest


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per test module, with a fixed CPU count, bound to 127.0.0.1."""
    import ray

    from pipeline.run import loopback_only

    with loopback_only():  # a `_node_ip_address` of 127.0.0.1 alone does not keep Ray on loopback
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
