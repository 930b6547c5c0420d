import gesim


def test_registry_lists_at_least_twenty_losses():
    assert len(gesim.losses.names()) >= 20
