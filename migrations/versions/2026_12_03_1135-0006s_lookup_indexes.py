"""lookup at scale: latest metric values in an indexed table, a searchable text per version

Adds version_metrics_latest (each (version, key)'s latest value, indexed by (key, value,
version_id)), metrics(version_id, id) for loading a version's metrics, versions(base_model_id,
adapter_id, number, rank_min, rank_max, id) for lookup's newest-per-adapter window, and versions.search_text
(lower("namespace/name message"), what ?q= matches) with a trigram index on Postgres (pg_trgm, a
trusted extension the database owner may create).

Revision ID: 0006s
Revises: 0006c
Create Date: 2026-12-03 11:35:00.000000

Backfill: every (version, key) gets the value of its metrics row with the highest id (the latest
evaluation, as lookups always chose); every version its search text.
"""
from alembic import op
import sqlalchemy as sa


revision = '0006s'
down_revision = '0006c'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'version_metrics_latest',
        sa.Column('version_id', sa.Integer(), nullable=False),
        sa.Column('key', sa.String(length=128), nullable=False),
        sa.Column('value', sa.Float(), nullable=False),
        sa.Column('metric_id', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_version_metrics_latest_version_id_versions'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('version_id', 'key', name=op.f('pk_version_metrics_latest')),
    )
    op.execute(
        "INSERT INTO version_metrics_latest (version_id, key, value, metric_id)"
        " SELECT m.version_id, m.key, m.value, m.id FROM metrics m"
        " WHERE m.id = (SELECT max(l.id) FROM metrics l WHERE l.version_id = m.version_id AND l.key = m.key)"
    )
    with op.batch_alter_table('version_metrics_latest', schema=None) as batch_op:
        batch_op.create_index('ix_version_metrics_latest_key_value', ['key', 'value', 'version_id'], unique=False)
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.create_index('ix_metrics_version_id', ['version_id', 'id'], unique=False)

    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('search_text', sa.Text(), nullable=True))
        batch_op.create_index('ix_versions_base_adapter_number',
                              ['base_model_id', 'adapter_id', 'number', 'rank_min', 'rank_max', 'id'], unique=False)
    op.execute(
        "UPDATE versions SET search_text = (SELECT lower(adapters.namespace || '/' || adapters.name || ' '"
        " || coalesce(versions.message, '')) FROM adapters WHERE adapters.id = versions.adapter_id)"
    )
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.alter_column('search_text', existing_type=sa.Text(), nullable=False)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.create_index('ix_versions_search_text_trgm', 'versions', ['search_text'], unique=False,
                        postgresql_using='gin', postgresql_ops={'search_text': 'gin_trgm_ops'})


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_index('ix_versions_search_text_trgm', table_name='versions')
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_index('ix_versions_base_adapter_number')
        batch_op.drop_column('search_text')
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.drop_index('ix_metrics_version_id')
    with op.batch_alter_table('version_metrics_latest', schema=None) as batch_op:
        batch_op.drop_index('ix_version_metrics_latest_key_value')
    op.drop_table('version_metrics_latest')
