"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-28 09:57:00.397741

Policy: a migration imports only alembic.op and sqlalchemy (history is frozen: never the models),
ships a working downgrade, and is tested by tests/db/test_migrations.py (one head, upgrade from
empty, downgrade/upgrade round trip, models == migrations).
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('adapters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('namespace', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('last_number', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapters')),
    sa.UniqueConstraint('namespace', 'name', name=op.f('uq_adapters_namespace_name'))
    )
    op.create_table('base_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('weights_digest', sa.String(length=71), nullable=False),
    sa.Column('layout_digest', sa.String(length=71), nullable=False),
    sa.Column('model_type', sa.String(length=128), nullable=True),
    sa.Column('architectures', sa.JSON(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('tensors', sa.JSON(), nullable=False),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.Column('weights_uploaded', sa.Boolean(), nullable=False),
    sa.Column('parameter_count', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("layout_digest LIKE 'sha256:%' AND length(layout_digest) = 71", name=op.f('ck_base_models_layout_digest_sha256')),
    sa.CheckConstraint("weights_digest LIKE 'sha256:%' AND length(weights_digest) = 71", name=op.f('ck_base_models_weights_digest_sha256')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_base_models')),
    sa.UniqueConstraint('weights_digest', name=op.f('uq_base_models_weights_digest'))
    )
    with op.batch_alter_table('base_models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_base_models_layout_digest'), ['layout_digest'], unique=False)

    op.create_table('blobs',
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("digest LIKE 'sha256:%' AND length(digest) = 71", name=op.f('ck_blobs_digest_sha256')),
    sa.PrimaryKeyConstraint('digest', name=op.f('pk_blobs'))
    )
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_blobs_last_seen_at'), ['last_seen_at'], unique=False)

    op.create_table('tokens',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('scope', sa.String(length=16), nullable=False),
    sa.Column('namespaces', sa.JSON(), nullable=False),
    sa.Column('description', sa.String(length=256), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tokens'))
    )
    op.create_table('alias_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('version_number', sa.Integer(), nullable=True),
    sa.Column('actor', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_alias_events_adapter_id_adapters'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alias_events'))
    )
    with op.batch_alter_table('alias_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alias_events_adapter_id'), ['adapter_id'], unique=False)

    op.create_table('base_names',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('revision', sa.String(length=128), nullable=False),
    sa.Column('base_model_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], name=op.f('fk_base_names_base_model_id_base_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_base_names')),
    sa.UniqueConstraint('name', 'revision', 'base_model_id', name=op.f('uq_base_names_name_revision_base_model_id'))
    )
    with op.batch_alter_table('base_names', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_base_names_name'), ['name'], unique=False)

    op.create_table('versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('manifest_digest', sa.String(length=71), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('facts', sa.JSON(), nullable=False),
    sa.Column('warnings', sa.JSON(), nullable=False),
    sa.Column('rank_min', sa.Integer(), nullable=False),
    sa.Column('rank_max', sa.Integer(), nullable=False),
    sa.Column('use_dora', sa.Boolean(), nullable=False),
    sa.Column('task_type', sa.String(length=64), nullable=True),
    sa.Column('base_model_id', sa.Integer(), nullable=True),
    sa.Column('base_mapping', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("manifest_digest LIKE 'sha256:%' AND length(manifest_digest) = 71", name=op.f('ck_versions_manifest_digest_sha256')),
    sa.CheckConstraint('number > 0', name=op.f('ck_versions_number_positive')),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_versions_adapter_id_adapters'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], name=op.f('fk_versions_base_model_id_base_models'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_versions')),
    sa.UniqueConstraint('adapter_id', 'manifest_digest', name=op.f('uq_versions_adapter_id_manifest_digest')),
    sa.UniqueConstraint('adapter_id', 'number', name=op.f('uq_versions_adapter_id_number'))
    )
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_versions_base_model_id'), ['base_model_id'], unique=False)
        batch_op.create_index('ix_versions_base_rank', ['base_model_id', 'rank_max'], unique=False)
        batch_op.create_index(batch_op.f('ix_versions_manifest_digest'), ['manifest_digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_versions_task_type'), ['task_type'], unique=False)

    op.create_table('aliases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_aliases_adapter_id_adapters'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_aliases_version_id_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_aliases')),
    sa.UniqueConstraint('adapter_id', 'name', name=op.f('uq_aliases_adapter_id_name'))
    )
    with op.batch_alter_table('aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_aliases_version_id'), ['version_id'], unique=False)

    op.create_table('metrics',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_metrics_version_id_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_metrics'))
    )
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.create_index('ix_metrics_key_version', ['key', 'version_id'], unique=False)

    op.create_table('version_files',
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=256), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.CheckConstraint("digest LIKE 'sha256:%' AND length(digest) = 71", name=op.f('ck_version_files_digest_sha256')),
    sa.ForeignKeyConstraint(['digest'], ['blobs.digest'], name=op.f('fk_version_files_digest_blobs'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_version_files_version_id_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('version_id', 'path', name=op.f('pk_version_files'))
    )
    with op.batch_alter_table('version_files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_version_files_digest'), ['digest'], unique=False)

    op.create_table('version_targets',
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('target', sa.String(length=256), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_version_targets_version_id_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('version_id', 'target', name=op.f('pk_version_targets'))
    )
    with op.batch_alter_table('version_targets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_version_targets_target'), ['target'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('version_targets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_version_targets_target'))

    op.drop_table('version_targets')
    with op.batch_alter_table('version_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_version_files_digest'))

    op.drop_table('version_files')
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.drop_index('ix_metrics_key_version')

    op.drop_table('metrics')
    with op.batch_alter_table('aliases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_aliases_version_id'))

    op.drop_table('aliases')
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_versions_task_type'))
        batch_op.drop_index(batch_op.f('ix_versions_manifest_digest'))
        batch_op.drop_index('ix_versions_base_rank')
        batch_op.drop_index(batch_op.f('ix_versions_base_model_id'))

    op.drop_table('versions')
    with op.batch_alter_table('base_names', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_base_names_name'))

    op.drop_table('base_names')
    with op.batch_alter_table('alias_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alias_events_adapter_id'))

    op.drop_table('alias_events')
    op.drop_table('tokens')
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_blobs_last_seen_at'))

    op.drop_table('blobs')
    with op.batch_alter_table('base_models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_base_models_layout_digest'))

    op.drop_table('base_models')
    op.drop_table('adapters')
